"""Consistent mode end to end on the tiny demo bundle, loaded through the real loading code."""

import numpy as np
import pytest
import torch

from models.demo_pulid import ensure_demo_bundle
from pipelines.identity import IdentityCache, IdentityEmbedding, MultipleFaces, NoFace
from pipelines.engine import SamplingStopped
from pipelines.pulid_flux import PuLIDFluxPipeline
from tests.conftest import assert_regenerates, force_parsing_label

SIZE = dict(width=64, height=64, steps=3, guidance_scale=3.5)
PROMPT = "portrait photo of a person"


def reference(seed: int) -> np.ndarray:
    """A mid-brightness photo-like image: the demo detector finds exactly one face in it."""
    rng = np.random.default_rng(seed)
    return rng.integers(60, 200, size=(96, 128, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> PuLIDFluxPipeline:
    bundle = ensure_demo_bundle(tmp_path_factory.mktemp("cache"))
    return PuLIDFluxPipeline.load(bundle, "cpu", torch.float32)


@pytest.fixture(scope="module")
def identity(pipe) -> IdentityEmbedding:
    return pipe.compute_identity(reference(0))


def plain_flux(pipe: PuLIDFluxPipeline, seed: int) -> np.ndarray:
    out = pipe.flux(prompt=[PROMPT], width=64, height=64, num_inference_steps=3, guidance_scale=3.5,
                    generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np").images[0]
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_identity_tokens_have_published_shape_and_depend_on_the_face(pipe, identity):
    assert identity.tokens.shape == (1, 4, 16)  # tiny: num_queries 4, id_dim 16 (real: 32 x 2048)
    other = pipe.compute_identity(reference(1))
    assert not torch.allclose(identity.tokens, other.tokens)


def test_face_parsing_decides_what_eva_sees(pipe):
    """All-background parsing paints the whole face white, so EVA's part of the identity changes."""
    encoder = pipe.identity_encoder
    saved = {k: v.clone() for k, v in encoder.parser.state_dict().items()}
    tokens = {}
    try:
        for label in (0, 1):  # background everywhere / skin everywhere (then EVA sees the gray face)
            force_parsing_label(encoder.parser, label)
            tokens[label] = encoder.encode(reference(0)).tokens
    finally:
        encoder.parser.load_state_dict(saved)
    assert not torch.allclose(tokens[0], tokens[1])


def test_identity_changes_the_image_and_weight_zero_is_plain_flux(pipe, identity):
    with_id = pipe.render([PROMPT], [7], identity=identity, id_weight=1.0, **SIZE)[0]
    without = pipe.render([PROMPT], [7], identity=identity, id_weight=0.0, **SIZE)[0]
    assert with_id.shape == (64, 64, 3) and with_id.dtype == np.uint8
    assert diff(with_id, without) > 1.0
    # after an identity run the hooks must be off again: weight 0 is exactly stock FLUX
    assert_regenerates(without, plain_flux(pipe, 7))


def test_identity_start_step(pipe, identity):
    late = pipe.render([PROMPT], [3], identity=identity, id_weight=1.0, identity_start_step=2, **SIZE)[0]
    never = pipe.render([PROMPT], [3], identity=identity, id_weight=1.0, identity_start_step=3, **SIZE)[0]
    full = pipe.render([PROMPT], [3], identity=identity, id_weight=1.0, identity_start_step=0, **SIZE)[0]
    assert_regenerates(never, plain_flux(pipe, 3))
    assert diff(late, never) > 0.1 and diff(late, full) > 0.1


def test_batched_equals_unbatched_per_seed(pipe, identity):
    prompts, seeds = [PROMPT, "a person at the beach"], [11, 12]
    batch = pipe.render(prompts, seeds, identity=identity, id_weight=1.0, **SIZE)
    for prompt, seed, image in zip(prompts, seeds, batch):
        single = pipe.render([prompt], [seed], identity=identity, id_weight=1.0, **SIZE)[0]
        assert np.abs(single.astype(np.int16) - image).max() <= 1
    assert diff(batch[0], batch[1]) > 1.0


def test_face_count_errors(pipe):
    with pytest.raises(NoFace):
        pipe.compute_identity(np.zeros((96, 96, 3), np.uint8))
    with pytest.raises(MultipleFaces):
        pipe.compute_identity(np.full((96, 96, 3), 255, np.uint8))


def test_identity_cache_hit(pipe):
    image = reference(5)
    hits, misses = pipe.identity_cache.hits, pipe.identity_cache.misses
    first = pipe.compute_identity(image)
    second = pipe.compute_identity(image.copy())
    assert (first.from_cache, second.from_cache) == (False, True)
    assert (pipe.identity_cache.hits - hits, pipe.identity_cache.misses - misses) == (1, 1)
    torch.testing.assert_close(first.tokens, second.tokens)


def test_identity_cache_evicts_least_recently_used():
    cache = IdentityCache(2)
    entry = IdentityEmbedding(tokens=torch.zeros(1), bbox=(0, 0, 1, 1))
    cache.put("a", entry)
    cache.put("b", entry)
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", entry)
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2


def test_cancel_check_stops_generation(pipe, identity):
    calls = []
    with pytest.raises(SamplingStopped):
        pipe.render(
            [PROMPT], [1], identity=identity, id_weight=1.0, should_stop=lambda: calls.append(1) or True, **SIZE
        )
    assert len(calls) == 1, "the first step's check must stop the run"


def test_rows_of_different_identities_and_start_steps_share_calls_and_equal_their_solo_runs(pipe, identity):
    """Consistent mode on the scheduler: rows of one size with their own identity (or none), start
    step, steps and guidance share calls, join mid-way, and each equals its solo render."""
    from pipelines.engine import ImageItem
    from pipelines.pulid_flux import PuLIDSpec

    other = pipe.compute_identity(reference(1))
    jobs = [(ImageItem(PROMPT, "", 3), PuLIDSpec(64, 64, 3, 3.5, "a", 1.0, 1, identity)),
            (ImageItem("a person at the beach", "", 4), PuLIDSpec(64, 64, 4, 2.0, "b", 0.8, 0, other)),
            (ImageItem(PROMPT, "", 5), PuLIDSpec(64, 64, 3, 3.5, "c", 0.0, 0, identity))]
    assert len({pipe.batch_key(spec, item) for item, spec in jobs}) == 1
    rows = pipe.start([jobs[0][0]], jobs[0][1])
    pipe.step(rows)
    rows += pipe.start([jobs[1][0]], jobs[1][1])
    pipe.step(rows[1:])
    rows += pipe.start([jobs[2][0]], jobs[2][1])
    while not all(row.done for row in rows):
        pipe.step([row for row in rows if not row.done])
    for image, (item, spec) in zip(pipe.finish(rows), jobs):
        alone = pipe.render([item.prompt], [item.seed], spec.width, spec.height, spec.steps, spec.guidance_scale,
                            spec.identity, spec.id_weight, spec.identity_start_step)[0]
        assert_regenerates(image, alone)
    assert_regenerates(pipe.finish(rows[2:])[0], plain_flux(pipe, 5))  # weight 0 beside identity rows: plain
