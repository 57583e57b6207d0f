"""Image-to-image and inpainting on the demo model: the simple workflow equals diffusers' own
pipelines, image-to-image rows share model calls with text-to-image rows (each at its own sigma) and
come out as alone, the kept region is kept, a strength skips the steps it should, and danrisi
enters its schedule where documented (docs/API.md, "Image to image")."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.engine import ImageItem, run_lockstep
from pipelines.img2img import (
    InitImage, danrisi_schedule, image_latents, preprocess_image, preprocess_mask, start_index,
)
from pipelines.samplers import danrisi_sigmas, danrisi_start_noise
from pipelines.z_image import BatchSpec
from tests.conftest import assert_differs, assert_regenerates

SIZE = 64
RGB = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
OTHER_RGB = np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
MASK_RGB = np.zeros((SIZE, SIZE, 3), np.uint8)
MASK_RGB[:, 24:] = 255  # repaint the right part, keep the left


@pytest.fixture(scope="module")
def engine(handler_module):
    return handler_module.WORKER.engine


def _init(rgb: np.ndarray = RGB, mask: np.ndarray | None = None) -> InitImage:
    return InitImage(preprocess_image(rgb, SIZE, SIZE), None if mask is None else preprocess_mask(mask, SIZE, SIZE))


def _spec(steps: int, strength: float, workflow: str = "z-image-simple", guidance: float = 0.0) -> BatchSpec:
    return BatchSpec(SIZE, SIZE, steps, guidance, workflow, 0.5 if workflow == "z-image-danrisi" else None, strength)


def _uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


@contextmanager
def model_calls(engine):
    """Each transformer call's row sigmas (the model sees t = 1 - sigma)."""
    calls: list[list[float]] = []
    hook = engine.pipe.transformer.register_forward_pre_hook(lambda _m, args: calls.append((1 - args[1]).tolist()))
    try:
        yield calls
    finally:
        hook.remove()


@contextmanager
def model_call_sigmas(engine):
    """The sigma of every transformer call of one row."""
    with model_calls(engine) as calls:
        sigmas: list[float] = []
        yield sigmas
    sigmas.extend(call[0] for call in calls)


# -- the simple workflow is diffusers' pipelines ------------------------------------------------------
@pytest.mark.parametrize(("strength", "guidance"), [(0.5, 0.0), (0.7, 2.5)])
def test_image_to_image_reproduces_diffusers_img2img_pipeline(engine, strength, guidance):
    from diffusers import ZImageImg2ImgPipeline

    ours = engine.generate([ImageItem("a cat", "blurry", 5, init=_init())], _spec(4, strength, guidance=guidance))
    reference = ZImageImg2ImgPipeline(**engine.pipe.components)(
        "a cat", image=Image.fromarray(RGB), strength=strength, negative_prompt="blurry", height=SIZE, width=SIZE,
        num_inference_steps=4, guidance_scale=guidance, generator=torch.Generator().manual_seed(5), output_type="np",
    ).images[0]
    assert_regenerates(ours.images[0], _uint8(reference))


def test_inpainting_reproduces_diffusers_inpaint_pipeline(engine):
    from diffusers import ZImageInpaintPipeline

    ours = engine.generate([ImageItem("a cat", "", 7, init=_init(mask=MASK_RGB))], _spec(4, 0.75))
    reference = ZImageInpaintPipeline(**engine.pipe.components)(
        "a cat", image=Image.fromarray(RGB), mask_image=Image.fromarray(MASK_RGB), strength=0.75, height=SIZE,
        width=SIZE, num_inference_steps=4, guidance_scale=0.0, generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images[0]
    assert_regenerates(ours.images[0], _uint8(reference))


def test_rows_of_different_images_and_seeds_batch_like_each_alone(engine):
    first, second = _init(), _init(OTHER_RGB)
    spec = _spec(3, 0.6)
    batch = engine.generate([ImageItem("a cat", "", 1, init=first), ImageItem("a cat", "", 2, init=first),
                             ImageItem("a cat", "", 1, init=second)], spec).images
    for position, item in enumerate([ImageItem("a cat", "", 1, init=first), ImageItem("a cat", "", 2, init=first),
                                     ImageItem("a cat", "", 1, init=second)]):
        assert_regenerates(batch[position], engine.generate([item], spec).images[0])
    assert_differs(batch[0], batch[1])  # each seed its own VAE sample and noise


@pytest.mark.parametrize("workflow", ["z-image-simple", "z-image-danrisi"])
def test_inpainting_keeps_the_kept_latents_exactly(engine, workflow):
    """After the last step the kept region (mask 0) is the image's clean latents, the repainted region
    the sampler's: the row's blend runs after every step, down to sigma 0 (danrisi: after its last
    call)."""
    items = [ImageItem("a cat", "", 3, init=_init(mask=MASK_RGB))]
    spec = _spec(4, 1.0, workflow)
    [start] = engine.image_starts(items, spec)
    [row] = engine.start(items, spec)
    run_lockstep([row], engine.step, lambda: False)
    blend = start.blend(items[0].init.mask)
    kept = (blend.mask == 0).expand_as(row.latents)
    assert kept.any() and (~kept).any()
    assert torch.equal(row.latents[kept], start.latents[kept])
    assert not torch.allclose(row.latents[~kept], start.latents[~kept])


def test_image_to_image_rows_share_calls_with_text_to_image_rows_and_equal_their_solo_runs(engine):
    """One batch key for text to image, image to image at two strengths and inpainting: rows started
    at different times run together, each at its own sigma (an image-to-image row joins with its
    shorter tail), and each image equals its solo run."""
    jobs = [(ImageItem("a cat", "", 1), _spec(4, None)),
            (ImageItem("a cat", "", 2, init=_init()), _spec(4, 0.5)),
            (ImageItem("a cat", "", 3, init=_init(OTHER_RGB, MASK_RGB)), _spec(5, 0.75)),
            (ImageItem("a cat", "", 4, init=_init()), _spec(3, 0.7, "z-image-danrisi"))]
    assert len({engine.batch_key(spec, item) for item, spec in jobs}) == 1
    assert [engine.model_calls(spec) for _, spec in jobs] == [4, 2, 4, 2 * 2 + 1]
    rows = engine.start([jobs[0][0]], jobs[0][1])
    engine.step(rows)
    for item, spec in jobs[1:]:
        rows += engine.start([item], spec)  # joins mid-way, at its own sigma
    with model_calls(engine) as called:
        engine.step(rows)
    assert len(called) == 1 and len(set(called[0])) == 4  # one call: four rows, each at its own sigma
    while not all(row.done for row in rows):
        engine.step([row for row in rows if not row.done])
    for image, (item, spec), row in zip(engine.finish(rows), jobs, rows):
        assert row.error is None and row.calls_left == 0
        assert_regenerates(image, engine.generate([item], spec).images[0])


def test_the_vae_encoding_is_timed_as_its_own_stage(engine):
    timings = engine.generate([ImageItem("a cat", "", 1, init=_init())], _spec(2, 0.5)).timings_ms
    assert list(timings) == ["text_encoding", "vae_encoding", "denoising", "decoding"]


# -- strength: where a row starts ----------------------------------------------------------------------
def test_an_8_step_image_to_image_at_strength_half_makes_half_the_model_calls(engine):
    spec = _spec(8, 0.5)
    with model_call_sigmas(engine) as text_to_image:
        engine.generate([ImageItem("a cat", "", 1)], BatchSpec(SIZE, SIZE, 8, 0.0, "z-image-simple"))
    with model_call_sigmas(engine) as image_to_image:
        engine.generate([ImageItem("a cat", "", 1, init=_init())], spec)
    assert (len(text_to_image), len(image_to_image)) == (8, 4) == (8, engine.model_calls(spec))
    np.testing.assert_allclose(image_to_image, text_to_image[4:], atol=1e-6)  # the schedule's tail


@pytest.mark.parametrize(("steps", "strength", "first"), [(8, 0.5, 4), (8, 0.6, 3), (8, 1.0, 0), (8, 0.01, 7),
                                                          (25, 0.56, 10), (4, 0.75, 1)])
def test_start_index_is_diffusers_get_timesteps(steps, strength, first):
    """Including its float rounding: 25 * 0.56 is 14.000000000000002, so 15 of 25 steps run, not 14."""
    assert start_index(steps, strength) == first


def test_the_vae_latents_are_shifted_and_scaled_and_sampled_with_the_generator(engine):
    vae = engine.pipe.vae
    with torch.no_grad():
        posterior = vae.encode(preprocess_image(RGB, SIZE, SIZE)).latent_dist
    mode = image_latents(posterior, vae.config, None)
    torch.testing.assert_close(mode, (posterior.mean - 0.1159) * 0.3611)
    drawn = [image_latents(posterior, vae.config, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    torch.testing.assert_close(drawn[0], drawn[1])
    assert not torch.equal(drawn[0], drawn[2])


# -- danrisi ------------------------------------------------------------------------------------------
def test_the_danrisi_schedule_is_entered_at_res4lyfs_start_for_the_strength():
    sigmas = danrisi_sigmas(8, 3.0)
    torch.testing.assert_close(danrisi_schedule(sigmas, 1.0), sigmas)
    tail = danrisi_schedule(sigmas, 0.5)
    assert float(tail[0]) == pytest.approx(0.996 * 0.5)
    torch.testing.assert_close(tail[1:], sigmas[sigmas < 0.498])  # the graph's own sigmas below, sigma_min, 0
    torch.testing.assert_close(danrisi_schedule(sigmas, 0.001), torch.tensor([0.000996, 0.0], dtype=torch.float64))


def test_a_danrisi_row_starts_from_the_image_at_that_sigma_with_the_graphs_noise(engine):
    """The start latent is sigma*noise + (1 - sigma)*latent (the VAE's mode, shifted and scaled),
    with the seed's RES4LYF start noise; model calls at that sigma, then down the graph's schedule."""
    spec = _spec(8, 0.5, "z-image-danrisi")
    items = [ImageItem("a cat", "", 11, init=_init())]
    [start] = engine.image_starts(items, spec)
    with torch.no_grad():
        posterior = engine.pipe.vae.encode(items[0].init.pixels).latent_dist
    latents = image_latents(posterior, engine.pipe.vae.config, None)
    noise = danrisi_start_noise([11], tuple(latents.shape)).float()
    torch.testing.assert_close(start.x, 0.498 * noise + (1 - 0.498) * latents)
    with model_call_sigmas(engine) as called:
        engine.generate(items, spec)
    tail = [float(s) for s in danrisi_schedule(danrisi_sigmas(8, 3.0), 0.5)]
    steps = len(tail) - 2
    assert len(called) == 2 * steps + 1 < 2 * 8 + 1
    assert called[0] == pytest.approx(tail[0], abs=1e-6) and called[-1] == pytest.approx(tail[-2], abs=1e-6)


def test_danrisi_at_a_tiny_strength_returns_the_init_images_vae_round_trip(engine):
    """Entered at sigma 0.001, one model call takes the rest: the image comes back through the VAE
    (random weights or not), where text-to-image lands anywhere."""
    with torch.no_grad():
        posterior = engine.pipe.vae.encode(preprocess_image(RGB, SIZE, SIZE)).latent_dist
        round_trip = engine.decode(image_latents(posterior, engine.pipe.vae.config, None))[0].astype(float)
    with model_call_sigmas(engine) as called:
        tiny = engine.generate([ImageItem("a cat", "", 2, init=_init())], _spec(8, 0.001, "z-image-danrisi"))
    text_to_image = engine.generate([ImageItem("a cat", "", 2)], _spec(8, None, "z-image-danrisi")).images[0]
    assert len(called) == 1
    assert np.abs(tiny.images[0] - round_trip).mean() < 1.0 < np.abs(text_to_image - round_trip).mean()




# -- preprocessing ----------------------------------------------------------------------------------------
def test_preprocessing_is_the_image_processors_and_fits_other_sizes_without_stretching():
    from diffusers.image_processor import VaeImageProcessor

    torch.testing.assert_close(preprocess_image(RGB, SIZE, SIZE),
                               VaeImageProcessor(vae_scale_factor=16).preprocess(Image.fromarray(RGB)))
    grey = np.full((SIZE, SIZE, 3), 127, np.uint8)
    grey[:, 32:] = 128
    mask_processor = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True)
    torch.testing.assert_close(preprocess_mask(grey, SIZE, SIZE), mask_processor.preprocess(Image.fromarray(grey)))
    wide = np.zeros((64, 256, 3), np.uint8)
    wide[:, 96:160] = 255  # a white square in the middle of a black 4:1 strip
    square = preprocess_image(wide, 64, 64)
    assert square.shape == (1, 3, 64, 64) and square[..., 8:56].min() > 0.9  # centre kept whole, not squeezed
    assert preprocess_mask(wide, 64, 64).shape == (1, 1, 64, 64)

