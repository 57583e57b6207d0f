"""pipelines.lora on the demo model: every shipped format, refusals that leave nothing applied, and
mixed-LoRA batches whose images equal their solo runs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from models.z_image_demo import ensure_demo_model
from pipelines.acceleration import RECOMPILE_LIMIT
from pipelines.lora import LoraCache, LoraError, MixedLoraLayers, load_lora
from pipelines.z_image import BatchSpec, ImageItem, ZImageEngine
from tests.conftest import ROOT, assert_regenerates

DEMO_DIR = Path(os.environ.get("DEMO_MODEL_DIR", ROOT / ".cache" / "demo-models"))
# Attention (q/k/v/out), feed-forward and modulation of the main blocks and the refiners.
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
           "feed_forward.w2", "adaLN_modulation.0")
SPEC = BatchSpec(64, 64, 2, 0.0, "z-image-simple")


@pytest.fixture(scope="module")
def engine():
    return ZImageEngine.load(ensure_demo_model(DEMO_DIR), "cpu")


@pytest.fixture(scope="module")
def layers(engine):
    return engine.lora_layers  # installed by the engine at load, as served


def factors(layers: MixedLoraLayers, seed: int, rank: int = 4, std: float = 0.3) -> dict[str, tuple]:
    """Reference PEFT factors {module: (A (r, in), B (out, r))}: delta W = B @ A."""
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for name, layer in layers.targets.items():
        if name.endswith(TARGETS) and not name.startswith("context_refiner"):
            out_features, in_features = layer.weight.shape
            chosen[name] = (torch.randn(rank, in_features, generator=generator) * std,
                            torch.randn(out_features, rank, generator=generator) * std)
    return chosen


def peft_file(weights: dict[str, tuple], prefix: str = "transformer.") -> bytes:
    tensors = {}
    for module, (a, b) in weights.items():
        tensors[f"{prefix}{module}.lora_A.weight"] = a.clone()
        tensors[f"{prefix}{module}.lora_B.weight"] = b.clone()
    return save(tensors)


def peft_with_metadata_file(weights: dict[str, tuple]) -> bytes:
    """diffusers' save_lora_weights form: lora_alpha/r in the header; here alpha = 2r, B halved."""
    rank = next(iter(weights.values()))[0].shape[0]
    tensors = {}
    for module, (a, b) in weights.items():
        tensors[f"transformer.{module}.lora_A.weight"] = a
        tensors[f"transformer.{module}.lora_B.weight"] = b / 2
    metadata = {"lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": 2 * rank})}
    return save(tensors, metadata=metadata)


def down_up_file(weights: dict[str, tuple], key, alpha_factor: float = 0.5) -> bytes:
    """ComfyUI/kohya style: lora_down/lora_up with an alpha; alpha/r = alpha_factor, up compensated."""
    tensors = {}
    for module, (a, b) in weights.items():
        base = key(module)
        tensors[f"{base}.lora_down.weight"] = a
        tensors[f"{base}.lora_up.weight"] = b / alpha_factor
        tensors[f"{base}.alpha"] = torch.tensor(a.shape[0] * alpha_factor)
    return save(tensors)


def ai_toolkit_file(weights):
    return peft_file(weights, prefix="diffusion_model.")


def comfyui_file(weights):
    return down_up_file(weights, lambda m: f"diffusion_model.{m}")


def kohya_file(weights):
    return down_up_file(weights, lambda m: "lora_unet_" + m.replace(".", "_"))


def fused_qkv_file(weights: dict[str, tuple]) -> bytes:
    """Z-Image's original names: one `attention.qkv` LoRA (shared A, stacked B) and `attention.out`."""
    tensors, done = {}, set()
    for module, (a, b) in weights.items():
        block, _, leaf = module.rpartition(".attention.")
        if leaf in ("to_q", "to_k", "to_v"):
            if block not in done:
                done.add(block)
                stacked = torch.cat([weights[f"{block}.attention.to_{p}"][1] for p in "qkv"])
                tensors[f"diffusion_model.{block}.attention.qkv.lora_A.weight"] = a
                tensors[f"diffusion_model.{block}.attention.qkv.lora_B.weight"] = stacked
            continue
        name = f"{block}.attention.out" if leaf == "to_out.0" else module
        tensors[f"diffusion_model.{name}.lora_A.weight"] = a
        tensors[f"diffusion_model.{name}.lora_B.weight"] = b
    return save(tensors)


def deltas(weights: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {module: b.float() @ a.float() for module, (a, b) in weights.items()}


def assert_same_deltas(adapter, weights) -> None:
    ours, reference = deltas(adapter.factors), deltas(weights)
    assert set(ours) == set(reference)
    for module, delta in reference.items():
        torch.testing.assert_close(ours[module], delta, rtol=1e-5, atol=1e-5)


# -- formats -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("writer", "fmt"),
    [(peft_file, "diffusers"), (peft_with_metadata_file, "diffusers"), (lambda w: peft_file(w, ""), "peft"),
     (ai_toolkit_file, "ai-toolkit"), (comfyui_file, "comfyui"), (kohya_file, "kohya")],
    ids=["diffusers", "diffusers-alpha-metadata", "peft-bare", "ai-toolkit", "comfyui-alpha", "kohya-alpha"],
)
def test_each_format_gives_the_deltas_of_its_peft_form(layers, writer, fmt):
    weights = factors(layers, seed=1)
    adapter = load_lora(writer(weights), layers)
    assert adapter.source_format == fmt
    assert_same_deltas(adapter, weights)


def test_fused_qkv_and_original_out_names_are_split_and_renamed(layers):
    weights = factors(layers, seed=2)
    # a fused qkv LoRA shares one A between q, k and v
    for module in list(weights):
        if module.endswith(".attention.to_q"):
            block = module.removesuffix(".to_q")
            for p in "kv":
                weights[f"{block}.to_{p}"] = (weights[module][0], weights[f"{block}.to_{p}"][1])
    adapter = load_lora(fused_qkv_file(weights), layers)
    assert_same_deltas(adapter, weights)


def test_adapter_is_keyed_by_the_file_sha256(layers):
    import hashlib

    data = peft_file(factors(layers, seed=1))
    assert load_lora(data, layers).sha256 == hashlib.sha256(data).hexdigest()


# -- refusals ------------------------------------------------------------------------------------
def refused(layers, data: bytes, rule: str, **limits) -> None:
    with pytest.raises(LoraError) as caught:
        load_lora(data, layers, **limits)
    assert rule in caught.value.rule, caught.value.rule


def test_mismatched_shapes_are_refused(layers):
    weights = factors(layers, seed=3)
    a, b = weights["layers.0.feed_forward.w1"]
    weights["layers.0.feed_forward.w1"] = (a[:, :-1].contiguous(), b)
    refused(layers, peft_file(weights), "has shapes A (4, 31), B (85, 4) for 'layers.0.feed_forward.w1'; the model "
            "needs A (r, 32), B (85, r)")


@pytest.mark.parametrize(("module", "rule"), [
    ("layers.9.attention.to_q", "targets 'layers.9.attention.to_q', which is not a linear layer of this model"),
    ("layers.0.attention_norm1", "targets 'layers.0.attention_norm1', which is not a linear layer of this model"),
    ("cap_embedder.1", "targets the input embedder 'cap_embedder.1', which per-image LoRA does not support"),
])
def test_unknown_or_unsupported_modules_are_refused(layers, module, rule):
    weights = factors(layers, seed=3)
    weights[module] = (torch.zeros(4, 32), torch.zeros(32, 4))
    refused(layers, peft_file(weights), rule)


def test_rank_size_values_and_types_are_bounded(layers):
    weights = factors(layers, seed=4, rank=8)
    refused(layers, peft_file(weights), "has rank 8 for", max_rank=4)
    refused(layers, peft_file(weights), "has more than 1000 parameters", max_parameters=1000)
    bad = dict(weights)
    bad["layers.1.attention.to_v"] = (weights["layers.1.attention.to_v"][0], torch.full((32, 8), float("nan")))
    refused(layers, peft_file(bad), "has non-finite weights for 'layers.1.attention.to_v'")
    bad["layers.1.attention.to_v"] = (torch.ones(8, 32, dtype=torch.int32), torch.ones(32, 8, dtype=torch.int32))
    refused(layers, peft_file(bad), "has non-float weights for 'layers.1.attention.to_v'")


def test_files_that_are_not_safetensors_loras_are_refused(layers):
    refused(layers, pickle.dumps({"a": 1}), "is not a safetensors file")
    refused(layers, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "is not a valid safetensors file")
    refused(layers, save({"layers.0.attention.to_q.weight": torch.zeros(2, 2)}), "has a key that is not a LoRA weight")
    refused(layers, save({"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 32)}),
            "has lora_A without lora_B")
    refused(layers, save({"diffusion_model.layers.0.attention.to_q.lokr_w1": torch.zeros(2, 2)}), "is a LoKr file")
    refused(layers, save({"lora_unet_layers_0_attention_to_q.lora_down.weight": torch.zeros(4, 32)}),
            "has keys that are not a LoRA for Z-Image")


def test_refused_lora_leaves_the_model_untouched(engine, layers):
    items = [ImageItem("a dog", "", 7)]
    before = engine.generate(items, SPEC).images
    weights = factors(layers, seed=5)
    weights["layers.0.nonexistent"] = weights["layers.0.attention.to_q"]
    with pytest.raises(LoraError):
        load_lora(peft_file(weights), layers)
    assert np.array_equal(engine.generate(items, SPEC).images, before)


# -- applying ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_adapters(layers):
    return (
        load_lora(kohya_file(factors(layers, seed=11)), layers),
        load_lora(peft_file(factors(layers, seed=12, rank=6)), layers),
    )


def with_loras(items: list[ImageItem], sets) -> list[ImageItem]:
    """Each item carrying its own (adapter, scale) pairs, as the worker sends them."""
    return [ImageItem(item.prompt, item.negative_prompt, item.seed, tuple(pairs)) for item, pairs in zip(items, sets)]


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_mixed_batch_images_equal_their_solo_runs(engine, layers, two_adapters, guidance):
    first, second = two_adapters
    spec = BatchSpec(64, 64, 2, guidance, "z-image-simple")
    items = [ImageItem("a dog", "a cat", seed) for seed in (1, 2, 3, 4)]
    sets = [[(first, 1.0)], [(second, 0.7)], [], [(first, 0.5), (second, -1.0)]]
    batch = engine.generate(with_loras(items, sets), spec).images
    plain = engine.generate(items, spec).images
    for position, (item, adapters) in enumerate(zip(items, sets)):
        alone = engine.generate(with_loras([item], [adapters]), spec).images[0]
        assert_regenerates(batch[position], alone)
        if adapters:  # the LoRA really changes the image (else this test could not fail)
            assert np.abs(alone.astype(int) - plain[position].astype(int)).max() > 10
        else:
            assert_regenerates(batch[position], plain[position])


def test_plain_run_after_lora_runs_equals_one_before(engine, layers, two_adapters):
    items = [ImageItem("a dog", "", 21), ImageItem("a dog", "", 22)]
    before = engine.generate(items, SPEC).images
    engine.generate(with_loras(items, [[(two_adapters[0], 1.0)], [(two_adapters[1], 1.0)]]), SPEC)
    assert np.array_equal(engine.generate(items, SPEC).images, before)


def test_scale_zero_equals_no_lora(engine, layers, two_adapters):
    items = [ImageItem("a dog", "", 31), ImageItem("a dog", "", 32)]
    plain = engine.generate(items, SPEC).images
    zero = with_loras(items, [[(two_adapters[0], 0.0)], [(two_adapters[1], 0.0)]])
    assert np.array_equal(engine.generate(zero, SPEC).images, plain)
    beside_a_live_one = with_loras(items, [[(two_adapters[0], 1.0)], [(two_adapters[1], 0.0)]])
    assert_regenerates(engine.generate(beside_a_live_one, SPEC).images[1], plain[1])


def test_lora_delta_equals_merged_weights(engine, layers, two_adapters):
    """The hook adds exactly scale * B A x: the same as merging the LoRA into the weights."""
    adapter = two_adapters[1]
    transformer = engine.pipe.transformer
    latents = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))]
    caption = [torch.randn(32, 32, generator=torch.Generator().manual_seed(1))]
    t = torch.tensor([0.5])
    with torch.no_grad(), layers.active([[(adapter, 0.8)]]):
        hooked = transformer(latents, t, caption, return_dict=False)[0][0]
    saved = {name: layers.targets[name].weight.detach().clone() for name in adapter.factors}
    try:
        with torch.no_grad():
            for name, (a, b) in adapter.factors.items():
                layers.targets[name].weight += 0.8 * (b @ a)
            merged = transformer(latents, t, caption, return_dict=False)[0][0]
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                layers.targets[name].weight.copy_(weight)
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-4)


def test_adapter_cache_is_bounded_by_count_and_reports_hits(layers):
    cache = LoraCache(capacity=2)
    files = {f"sha{i}": peft_file(factors(layers, seed=40 + i)) for i in range(3)}
    loads = []

    def loader(sha):
        return lambda: loads.append(sha) or load_lora(files[sha], layers, sha256=sha)

    assert cache.get_or_load("sha0", loader("sha0"))[1] is False
    assert cache.get_or_load("sha0", loader("sha0"))[1] is True
    cache.get_or_load("sha1", loader("sha1"))
    cache.get_or_load("sha2", loader("sha2"))  # evicts sha0, the least recently used
    assert len(cache) == 2
    assert cache.get_or_load("sha2", loader("sha2"))[1] is True
    assert cache.get_or_load("sha0", loader("sha0"))[1] is False
    assert loads == ["sha0", "sha1", "sha2", "sha0"]
    with pytest.raises(LoraError):
        cache.get_or_load("bad", lambda: load_lora(b"nope", layers))
    assert cache.get_or_load("sha0", loader("sha0"))[1] is True


# -- compile -------------------------------------------------------------------------------------
@torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)  # as compile_blocks sets it (and restored after)
def test_compiled_blocks_switch_loras_batches_and_cfg_without_recompiling(restore_attention_backend):
    """Regional compile as the worker does it (fullgraph, automatic dynamic), traced by dynamo with
    the eager backend (the recompiles are dynamo's; Inductor would only slow this test down)."""
    from torch._dynamo.utils import counters

    engine = ZImageEngine.load(ensure_demo_model(DEMO_DIR), "cpu")
    layers = engine.lora_layers
    first, second, third = (
        load_lora(peft_file(factors(layers, seed=s, rank=r)), layers) for s, r in ((51, 4), (52, 2), (53, 4))
    )
    eager_spec = BatchSpec(64, 64, 1, 2.5, "z-image-simple")
    items = [ImageItem("a dog", "a cat", seed) for seed in range(3)]
    late_sets = [[(second, 0.5)], [], [(third, 1.0), (second, -1.0)]]  # other adapters, scales, batch
    eager = engine.generate(with_loras(items, late_sets), eager_spec).images
    engine.pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=None, backend="eager")
    spec = BatchSpec(64, 64, 1, 0.0, "z-image-simple")
    engine.generate(items[:1], spec)  # plain at batch 1, then 2: the worker's warm-up
    engine.generate(items[:2], spec)
    for warm in ([[(first, 1.0)]], [[(first, 1.0)], []]):  # + the LoRA path the same way, rank bucket 8
        engine.generate(with_loras(items[:len(warm)], warm), spec)
    graphs = counters["stats"]["unique_graphs"]
    compiled = engine.generate(with_loras(items, late_sets), eager_spec).images  # batch 3 with CFG: 6 rows
    engine.generate(with_loras(items[:1], [[(third, 2.0)]]), spec)
    assert counters["stats"]["unique_graphs"] == graphs
    for position in range(3):
        assert_regenerates(compiled[position], eager[position])
