"""Store a diffusers folder's transformer in bf16, in place: the precision the worker serves it in.

    python -m builder.to_bf16 /models/z-image-turbo     # the Dockerfile's step, after the download

Z-Image-Turbo's transformer is published in fp32 (3 shards, about 24.6 GB), and on CUDA the worker
loads it with `dtype=torch.bfloat16`, which casts every tensor anyway. Casting once at build time
halves the bytes the image carries and every cold start reads, and gives the GPU the same tensors
(the same `Tensor.to(torch.bfloat16)` cast). On CPU the worker still loads float32, upcasting.

Kept in fp32: the tensors of the modules the model class names in `_keep_in_fp32_modules`, which
diffusers keeps in fp32 when loading in bf16 (matched the way diffusers matches them: a module
name equal to one part of the tensor's dotted name). ZImageTransformer2DModel names none (its
precision-sensitive `t_embedder` and `cap_embedder` appear only in
`_skip_layerwise_casting_patterns`, which is about fp8 storage, and are cast to bf16 on CUDA
today), so for Z-Image every fp32 tensor becomes bf16. Other dtypes are left as they are.

Safe to interrupt: new shards are written under new names, then the index
(`diffusion_pytorch_model.safetensors.index.json`, which diffusers prefers to a single file) is
replaced atomically, and only then are the old files deleted. At every moment the folder loads,
fp32 or bf16. A second run finds nothing in fp32, removes any leftovers and changes nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path


from builder.manifest import MODEL_INFO_FILE, file_digest

COMPONENT = "transformer"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SHARD_NAME = "diffusion_pytorch_model-bf16-{:05d}-of-{:05d}.safetensors"
WEIGHT_GLOB = "diffusion_pytorch_model*.safetensors"
MAX_SHARD_BYTES = 2 * 10**9  # the build holds one shard in memory while writing it: ~1 GB + this at peak
FP32 = "F32"  # safetensors' dtype name
ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


class ConversionError(RuntimeError):
    """The folder holds no transformer weights this tool can read."""


@dataclass
class Conversion:
    """What a run did: bytes before and after, tensors cast, tensors kept in fp32, files written."""

    bytes_before: int
    bytes_after: int
    cast: int
    kept_fp32: list[str]
    shards: list[str]


def keep_in_fp32_modules(component_dir: Path) -> tuple[str, ...]:
    """The module names the component's diffusers class keeps in fp32 when loaded in bf16."""
    import diffusers

    class_name = json.loads((component_dir / "config.json").read_text())["_class_name"]
    kept = getattr(diffusers, class_name)._keep_in_fp32_modules or ()
    return (kept,) if isinstance(kept, str) else tuple(kept)


def must_stay_fp32(name: str, kept_modules: tuple[str, ...]) -> bool:
    """diffusers' own rule (model_loading_utils): a kept module is one part of the dotted name."""
    return any(module in name.split(".") for module in kept_modules)


def weight_map(component_dir: Path) -> dict[str, str]:
    """Tensor name -> file, from the index when there is one (diffusers' own preference)."""
    index = component_dir / INDEX_FILE
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = component_dir / SINGLE_FILE
    if not single.is_file():
        raise ConversionError(f"{component_dir}: neither {INDEX_FILE} nor {SINGLE_FILE}")
    from safetensors import safe_open

    with safe_open(single, "pt") as handle:
        return dict.fromkeys(handle.keys(), SINGLE_FILE)


def tensor_dtypes(component_dir: Path, mapping: dict[str, str]) -> dict[str, str]:
    """Each tensor's stored dtype, read from the safetensors headers only."""
    from safetensors import safe_open

    dtypes: dict[str, str] = {}
    for file in sorted(set(mapping.values())):
        with safe_open(component_dir / file, "pt") as handle:
            dtypes.update((name, handle.get_slice(name).get_dtype()) for name in handle.keys())
    return dtypes


def convert(model_dir: Path, component: str = COMPONENT, max_shard_bytes: int = MAX_SHARD_BYTES) -> Conversion:
    """Cast the component's fp32 tensors (but the kept ones) to bf16, in place and atomically."""
    component_dir = Path(model_dir) / component
    mapping = weight_map(component_dir)
    dtypes = tensor_dtypes(component_dir, mapping)
    kept_modules = keep_in_fp32_modules(component_dir)
    kept = sorted(n for n, d in dtypes.items() if d == FP32 and must_stay_fp32(n, kept_modules))
    to_cast = [n for n, d in dtypes.items() if d == FP32 and n not in kept]
    before = _weight_bytes(component_dir)
    if not to_cast:  # already converted (or never fp32): only leftovers of an interrupted run go
        _remove_unreferenced(component_dir, set(mapping.values()))
        return Conversion(before, _weight_bytes(component_dir), 0, kept, sorted(set(mapping.values())))

    new_map = _write_shards(component_dir, mapping, set(to_cast), max_shard_bytes)
    total = sum((component_dir / f).stat().st_size for f in set(new_map.values()))
    _atomic_write(
        component_dir / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": new_map}, indent=2)
    )
    _remove_unreferenced(component_dir, set(new_map.values()))
    shards = sorted(set(new_map.values()))
    result = Conversion(before, _weight_bytes(component_dir), len(to_cast), kept, shards)
    _record(Path(model_dir), component, result)
    return result


def _write_shards(component_dir: Path, mapping: dict[str, str], to_cast: set[str], max_bytes: int) -> dict[str, str]:
    """Write every tensor (cast where asked) into new shards of at most ~max_bytes; return the map."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(component_dir / f, "pt")) for f in sorted(set(mapping.values()))}
        groups: list[list[str]] = [[]]
        size = 0
        for name in mapping:  # the index's order: the model's order, so shards hold neighbouring layers
            sliced = handles[mapping[name]].get_slice(name)
            elements = 1
            for dim in sliced.get_shape():
                elements *= dim
            nbytes = elements * (2 if name in to_cast else ITEM_BYTES.get(sliced.get_dtype(), 1))
            if groups[-1] and size + nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        new_map: dict[str, str] = {}
        for number, names in enumerate(groups, start=1):
            shard = SHARD_NAME.format(number, len(groups))
            tensors = {}
            for name in names:
                tensor = handles[mapping[name]].get_tensor(name)
                tensors[name] = tensor.to(torch.bfloat16) if name in to_cast else tensor
            staging = component_dir / f".{shard}.tmp"
            save_file(tensors, staging, metadata={"format": "pt"})
            _fsync(staging)
            os.replace(staging, component_dir / shard)
            new_map.update(dict.fromkeys(names, shard))
    return new_map


def _atomic_write(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text + "\n")
    _fsync(staging)
    os.replace(staging, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_unreferenced(component_dir: Path, referenced: set[str]) -> None:
    """Delete weight files the loader no longer reads, and staging files of an interrupted run."""
    for path in [*component_dir.glob(WEIGHT_GLOB), *component_dir.glob(".*.tmp")]:
        if path.name not in referenced:
            path.unlink()


def _weight_bytes(component_dir: Path) -> int:
    return sum(p.stat().st_size for p in component_dir.glob(WEIGHT_GLOB))


def _record(model_dir: Path, component: str, result: Conversion) -> None:
    """Note the conversion, with the new files' sizes and sha256, in the folder's model_info.json."""
    info_path = model_dir / MODEL_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    files = []
    for shard in result.shards:
        size, sha256 = file_digest(model_dir / component / shard)
        files.append({"path": f"{component}/{shard}", "size": size, "sha256": sha256})
    info.setdefault("converted", {})[component] = {
        "from": "float32", "to": "bfloat16", "kept_float32": result.kept_fp32, "files": files,
    }
    _atomic_write(info_path, json.dumps(info, indent=2))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a diffusers folder, e.g. /models/z-image-turbo")
    parser.add_argument("--component", default=COMPONENT)
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9)
    args = parser.parse_args(argv)
    try:
        result = convert(args.model_dir, args.component, int(args.max_shard_gb * 1e9))
    except ConversionError as err:
        print(f"to_bf16: {err}", file=sys.stderr)
        return 2
    print(
        f"to_bf16: {args.model_dir / args.component}: {result.cast} tensors cast to bf16, "
        f"{len(result.kept_fp32)} kept in fp32; weights {result.bytes_before:,} -> {result.bytes_after:,} bytes "
        f"in {len(result.shards)} file(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
