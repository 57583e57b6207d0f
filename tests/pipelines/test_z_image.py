"""The Z-Image engine on the demo model: faithful to diffusers, batch-safe, caching text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.samplers import danrisi_sigmas, danrisi_start_noise, sample_danrisi
from pipelines.z_image import BatchSpec, ImageItem
from tests.conftest import assert_differs, assert_regenerates


@pytest.fixture(scope="module")
def engine(handler_module):
    return handler_module.WORKER.engine


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_simple_workflow_reproduces_diffusers_pipeline_pixels(engine, guidance):
    spec = BatchSpec(64, 64, 4, guidance, "z-image-simple")
    ours = engine.generate([ImageItem("a cat", "blurry", 5)], spec).images[0]
    reference = engine.pipe(
        "a cat", negative_prompt="blurry", height=64, width=64, num_inference_steps=4, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(5), output_type="np",
    ).images[0]
    assert_regenerates(ours, (reference * 255).round().astype(np.uint8))


def test_cfg_with_a_negative_prompt_of_another_length_never_masks_attention(engine, restore_attention_backend):
    negative = "blurry, low quality, " * 6
    assert engine.text_length_bucket(negative) != engine.text_length_bucket("a cat")
    reference = engine.pipe(  # diffusers runs both halves as one masked batch
        "a cat", negative_prompt=negative, height=64, width=64, num_inference_steps=3, guidance_scale=2.5,
        generator=torch.Generator().manual_seed(5), output_type="np",
    ).images[0]
    transformer = engine.pipe.transformer
    transformer.set_attention_backend("_native_flash")  # torch's flash kernel: runs on CPU, refuses masks
    try:
        ours = engine.generate([ImageItem("a cat", negative, 5)], BatchSpec(64, 64, 3, 2.5, "z-image-simple")).images[0]
    finally:
        transformer.reset_attention_backend()
    assert_regenerates(ours, (reference * 255).round().astype(np.uint8))


def test_batched_images_equal_their_single_runs(engine):
    spec = BatchSpec(64, 64, 2, 0.0, "z-image-danrisi", eta=0.5)
    batch = engine.generate([ImageItem("a dog", "", seed) for seed in (1, 2, 3)], spec).images
    for position, seed in enumerate((1, 2, 3)):
        assert_regenerates(batch[position], engine.generate([ImageItem("a dog", "", seed)], spec).images[0])


def test_danrisi_workflow_runs_the_danrisi_sampler_with_each_images_seed(engine):
    """The engine's danrisi is `sample_danrisi` on `danrisi_sigmas`, with the batch's eta and each
    image's seed for its SDE noise, from the graph's start noise, on the engine's velocity."""
    items = [ImageItem("a fox", "", 4), ImageItem("a fox", "", 8)]
    spec = BatchSpec(64, 64, 3, 0.0, "z-image-danrisi", eta=0.7)
    ours = engine.generate(items, spec).images
    shift = float(engine.pipe.scheduler.config.get("shift", 3.0))
    with torch.no_grad():
        velocity = engine.velocity_function(engine.encode_prompts(["a fox"] * 2), None, 0.0)
        start = engine.initial_noise([4, 8], 64, 64, "z-image-danrisi")
        latents = sample_danrisi(start, danrisi_sigmas(3, shift), velocity,
                                 lambda: False, seeds=[4, 8], eta=0.7)
    reference = engine.decode(latents)
    assert torch.allclose(start, danrisi_start_noise([4, 8], tuple(start.shape)).float())
    for position in range(2):
        assert_regenerates(ours[position], reference[position])
    other_eta = engine.generate(items[:1], BatchSpec(64, 64, 3, 0.0, "z-image-danrisi", eta=0.0)).images[0]
    assert not np.array_equal(other_eta, ours[0])


def test_prompts_of_one_length_bucket_batch_without_changing_pixels(engine):
    """Different prompts that pad to the same caption length share a batch exactly like running alone."""
    first, second = "a red car", "a big dog"
    assert engine.text_length_bucket(first) == engine.text_length_bucket(second)
    spec = BatchSpec(64, 64, 2, 0.0, "z-image-simple")
    batch = engine.generate([ImageItem(first, "", 9), ImageItem(second, "", 9)], spec).images
    assert_regenerates(batch[1], engine.generate([ImageItem(second, "", 9)], spec).images[0])
    assert engine.text_length_bucket("word " * 40) > engine.text_length_bucket(first)


def test_identical_prompts_are_encoded_once(engine):
    prompt = "a unique character prompt for the cache test"
    misses = engine.prompt_cache.misses
    engine.encode_prompts([prompt] * 8)
    engine.encode_prompts([prompt])
    assert engine.prompt_cache.misses == misses + 1


def test_stage_timings_are_reported(engine):
    result = engine.generate([ImageItem("a hill", "", 1)], BatchSpec(64, 64, 1, 0.0, "z-image-simple"))
    assert set(result.timings_ms) == {"text_encoding", "denoising", "decoding"}
    assert result.images.shape == (1, 64, 64, 3) and result.images.dtype == np.uint8


def test_rows_paused_joining_and_sharing_calls_across_workflows_and_loras_equal_their_solo_runs(engine):
    """What the scheduler does with rows: start them at different times, run any subset of one batch
    key per call (each row at its own step, simple beside danrisi, different LoRAs and steps),
    leave some out for a while, decode as they finish. Every image equals its solo run."""
    from pipelines.lora import load_lora
    from tests.pipelines.test_lora import factors, peft_file

    alice = load_lora(peft_file(factors(engine.lora_layers, seed=41)), engine.lora_layers)
    bob = load_lora(peft_file(factors(engine.lora_layers, seed=42, rank=6)), engine.lora_layers)
    jobs = [(ImageItem("a red car", "", 1), BatchSpec(64, 64, 3, 0.0, "z-image-simple")),
            (ImageItem("a big dog", "", 2, ((alice, 1.0),)), BatchSpec(64, 64, 2, 0.0, "z-image-danrisi", eta=0.5)),
            (ImageItem("a red car", "", 3, ((bob, -1.0), (alice, 0.5))), BatchSpec(64, 64, 4, 0.0, "z-image-simple")),
            (ImageItem("a big dog", "", 4), BatchSpec(64, 64, 3, 0.0, "z-image-danrisi", eta=0.0))]
    assert len({engine.batch_key(spec, item) for item, spec in jobs}) == 1
    rows = engine.start([jobs[0][0]], jobs[0][1]) + engine.start([jobs[1][0]], jobs[1][1])
    assert [row.calls_left for row in rows] == [3, 5] == [engine.model_calls(spec) for _, spec in jobs[:2]]
    engine.step(rows[:1])
    engine.step(rows[:2])
    rows += engine.start([jobs[2][0]], jobs[2][1])  # joins mid-way
    engine.step(rows[1:3])
    engine.step([rows[0], rows[2]])
    rows += engine.start([jobs[3][0]], jobs[3][1])
    images: dict[int, np.ndarray] = {}
    while len(images) < len(rows):
        engine.step([row for row in rows if not row.done])
        finished = [i for i, row in enumerate(rows) if row.done and i not in images]
        for i, image in zip(finished, engine.finish([rows[i] for i in finished]) if finished else []):
            images[i] = image
    for i, (item, spec) in enumerate(jobs):
        assert rows[i].error is None and rows[i].calls_left == 0
        assert_regenerates(images[i], engine.generate([item], spec).images[0])
    assert_differs(images[0], engine.generate([ImageItem("a red car", "", 1, ((alice, 1.0),))], jobs[0][1]).images[0])


def test_cfg_rows_with_their_own_guidance_scales_share_a_call(engine):
    jobs = [(ImageItem("a red car", "blurry", 5), BatchSpec(64, 64, 3, 2.5, "z-image-simple")),
            (ImageItem("a big dog", "blurry", 6), BatchSpec(64, 64, 2, 6.0, "z-image-simple"))]
    assert engine.batch_key(jobs[0][1], jobs[0][0]) == engine.batch_key(jobs[1][1], jobs[1][0])
    assert engine.batch_key(BatchSpec(64, 64, 3, 0.0, "z-image-simple"), jobs[0][0]) != engine.batch_key(*jobs[0][::-1])
    rows = engine.start([jobs[0][0]], jobs[0][1])
    engine.step(rows)
    rows += engine.start([jobs[1][0]], jobs[1][1])
    while not all(row.done for row in rows):
        engine.step([row for row in rows if not row.done])
    for image, (item, spec) in zip(engine.finish(rows), jobs):
        assert_regenerates(image, engine.generate([item], spec).images[0])
