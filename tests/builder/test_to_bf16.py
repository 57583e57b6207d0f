"""builder/to_bf16.py on the real demo model: what it writes, that the worker's loader serves it,
that it survives an interruption at each step, and that a second run changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from builder import to_bf16
from builder.to_bf16 import INDEX_FILE, SINGLE_FILE, convert, keep_in_fp32_modules, main
from models.z_image_demo import MODEL_INFO_FILE, ensure_demo_model
from pipelines.z_image import BatchSpec, ImageItem, ZImageEngine

SPEC = BatchSpec(64, 64, 3, 0.0, "z-image-simple")
ITEMS = [ImageItem("a lighthouse at dusk", "", 7), ImageItem("a bowl of plums", "", 8)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def model(demo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo, tmp_path / "model"))


def stored_dtypes(component: Path) -> dict[str, str]:
    dtypes = {}
    for file in component.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            dtypes.update((name, handle.get_slice(name).get_dtype()) for name in handle.keys())
    return dtypes


def images(model_dir: Path) -> np.ndarray:
    engine = ZImageEngine.load(model_dir, "cpu")
    assert str(engine.dtype) == "torch.float32"  # the CPU loader upcasts bf16 files as it did fp32 ones
    return engine.generate(ITEMS, SPEC).images


def test_z_image_keeps_no_tensor_in_fp32(demo: Path) -> None:
    from diffusers import ZImageTransformer2DModel

    assert ZImageTransformer2DModel._keep_in_fp32_modules is None
    assert keep_in_fp32_modules(demo / "transformer") == ()


def test_a_converted_folder_loads_and_generates_what_the_fp32_folder_does(demo: Path, model: Path) -> None:
    before = stored_dtypes(model / "transformer")
    assert set(before.values()) == {"F32"}
    assert main([str(model)]) == 0

    component = model / "transformer"
    assert not (component / SINGLE_FILE).exists()
    index = json.loads((component / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(before) and stored_dtypes(component) == dict.fromkeys(before, "BF16")
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in component.glob("*.safetensors"))
    weights_after = sum(p.stat().st_size for p in component.glob("*.safetensors"))
    assert weights_after < 0.55 * (demo / "transformer" / SINGLE_FILE).stat().st_size
    recorded = json.loads((model / MODEL_INFO_FILE).read_text())
    assert recorded["demo"] and recorded["converted"]["transformer"]["to"] == "bfloat16"

    fp32, bf16 = images(demo), images(model)
    difference = np.abs(fp32.astype(int) - bf16.astype(int))
    assert difference.mean() < 0.5 and difference.max() <= 4, (difference.mean(), difference.max())
    assert not np.array_equal(fp32, bf16)  # the weights did change: the comparison is not vacuous


def test_a_second_run_changes_nothing(model: Path) -> None:
    first = convert(model)
    files = {p.name: p.read_bytes() for p in (model / "transformer").iterdir()}
    second = convert(model)
    assert (first.cast, second.cast) == (73, 0) and second.bytes_before == second.bytes_after == first.bytes_after
    assert {p.name: p.read_bytes() for p in (model / "transformer").iterdir()} == files


def test_a_run_stopped_before_the_index_swap_leaves_the_fp32_folder_serving(
    demo: Path, model: Path, monkeypatch
) -> None:
    def stop(path: Path, text: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(to_bf16, "_atomic_write", stop)
    with pytest.raises(KeyboardInterrupt):
        convert(model)
    assert (model / "transformer" / SINGLE_FILE).read_bytes() == (demo / "transformer" / SINGLE_FILE).read_bytes()
    assert not (model / "transformer" / INDEX_FILE).exists()
    np.testing.assert_array_equal(images(model), images(demo))

    monkeypatch.undo()
    assert convert(model).cast == 73
    assert sorted(p.name for p in (model / "transformer").iterdir()) == [
        "config.json", "diffusion_pytorch_model-bf16-00001-of-00001.safetensors", INDEX_FILE]


def test_a_run_stopped_after_the_index_swap_serves_bf16_and_a_rerun_clears_the_old_file(
    model: Path, monkeypatch
) -> None:
    def stop(component_dir: Path, referenced: set[str]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(to_bf16, "_remove_unreferenced", stop)
    with pytest.raises(KeyboardInterrupt):
        convert(model)
    assert (model / "transformer" / SINGLE_FILE).exists()  # the old file is still there, unread
    served = images(model)

    monkeypatch.undo()
    assert convert(model).cast == 0
    assert not (model / "transformer" / SINGLE_FILE).exists()
    np.testing.assert_array_equal(images(model), served)


def test_a_sharded_fp32_checkpoint_is_resharded_and_kept_modules_stay_fp32(model: Path, monkeypatch) -> None:
    """The published layout (an index and several fp32 shards), and a class that keeps modules in fp32."""
    from diffusers import ZImageTransformer2DModel

    component = model / "transformer"
    ZImageTransformer2DModel.from_pretrained(component).save_pretrained(component, max_shard_size="400KB")
    (component / SINGLE_FILE).unlink(missing_ok=True)
    assert len(set(json.loads((component / INDEX_FILE).read_text())["weight_map"].values())) > 1
    monkeypatch.setattr(ZImageTransformer2DModel, "_keep_in_fp32_modules", ["t_embedder"])

    result = convert(model, max_shard_bytes=200_000)
    dtypes = stored_dtypes(component)
    assert result.kept_fp32 == sorted(n for n in dtypes if n.startswith("t_embedder."))
    assert {dtypes[n] for n in result.kept_fp32} == {"F32"}
    assert {d for n, d in dtypes.items() if n not in result.kept_fp32} == {"BF16"}
    assert len(result.shards) > 1 and sorted(p.name for p in component.glob("*.safetensors")) == result.shards
    images(model)  # loads and runs


def test_a_folder_without_weights_is_refused_with_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "transformer").mkdir()
    assert main([str(tmp_path)]) == 2
    assert "neither diffusion_pytorch_model.safetensors.index.json" in capsys.readouterr().err
