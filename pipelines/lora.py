"""LoRA adapters for the Z-Image transformer, applied per image so one forward serves many LoRA sets.

Three parts, used in this order by the engine:

1. `load_lora(data, layers)` parses a safetensors file (never a pickle) in any of the formats Z-Image
   LoRAs ship in, converts it to diffusers module names (diffusers' own Z-Image converter does the
   non-diffusers formats; fused `qkv` and original `out` names are split/renamed here) and checks
   every tensor against the model BEFORE anything is used. A file that does not fit raises
   `LoraError(rule)` and changes nothing.
2. `MixedLoraLayers.install(transformer)` (once, at engine load) puts a forward hook on every
   targetable `nn.Linear`. With no adapters active the hook returns the base output untouched.
3. `with layers.active([[(adapter, scale), ...] per image])` makes one generation use, for image b,
   y_b = W x_b + sum_k scale_{b,k} * B_k A_k x_b. All distinct adapters of the call are stacked
   along the rank dimension (A: (R, in), B: (out, R); kept while consecutive model calls use the
   same adapters, as a scheduled group's calls do); a per-image scale mask (N, R)
   selects each image's adapters. So a mixed batch costs two extra matmuls per layer, whose rank R
   is the sum of the distinct adapters' ranks (padded to a power of two), and no per-image loops.

Compile (docs/LORA.md): the hooks run inside the regionally compiled blocks (fullgraph). They read
only tensors (each layer's stacked factors, one shared scale mask of a fixed row capacity) through
one hook function, so new adapters, scales and batch layouts are new tensor values, not new graphs;
"LoRA on" vs "off" is one more graph per block kind, and each new power of two of R one more.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from cachetools import LRUCache
from torch import nn

MAX_RANK = 256
MAX_PARAMETERS = 400_000_000  # 800 MB in bf16: larger than any LoRA of a 6 B model needs
MIN_PACKED_RANK = 8
MAX_ROWS = 32  # rows of one forward: 2 x a batch of 16 with CFG
# Modules fed the tokens of all images concatenated (not one row per image): a per-image LoRA
# cannot tell the images apart there, so such targets are refused.
FLATTENED_INPUT_PREFIXES = ("all_x_embedder.", "cap_embedder.", "siglip_embedder.")
FORMATS = ("diffusers", "peft", "ai-toolkit", "comfyui", "kohya")


class LoraError(ValueError):
    """A LoRA that cannot be used: its file does not fit this model, or its path gives no file
    (serving/lora_source.py); `rule` is the client-facing reason."""

    def __init__(self, rule: str) -> None:
        self.rule = rule
        super().__init__(rule)


@dataclass(frozen=True)
class LoraAdapter:
    """Validated low-rank factors by module name, on the model's device and dtype; alpha/rank
    (and PEFT's lora_alpha/r) already folded into B, so the layer delta is B @ A."""

    sha256: str
    source_format: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r))

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    @property
    def parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.factors.values())


AdapterSet = Sequence[tuple[LoraAdapter, float]]


# -- parsing -------------------------------------------------------------------------------------
def _short(name: str) -> str:
    """Key names come from the file: quote them, bounded."""
    return repr(name if len(name) <= 120 else name[:117] + "...")


def read_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; anything else (a pickle) is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) < 8 or int.from_bytes(data[:8], "little") + 8 > len(data):
        raise LoraError("is not a safetensors file")
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError):
        raise LoraError("is not a valid safetensors file") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return tensors, metadata if isinstance(metadata, dict) else {}


def _detect_format(keys: list[str]) -> str:
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui" if any(".lora_down." in k for k in keys) else "ai-toolkit"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    return "peft"


def _peft_scale(metadata: dict[str, str]) -> float:
    """PEFT/diffusers files keep lora_alpha and r in the header metadata, not as tensors."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return 1.0
    try:
        config = json.loads(raw)
        alpha, rank = float(config["lora_alpha"]), float(config["r"])
    except (ValueError, KeyError, TypeError):
        raise LoraError("has unreadable lora_adapter_metadata") from None
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraError("uses per-module rank_pattern/alpha_pattern, which is not supported")
    if rank <= 0:
        raise LoraError("has a non-positive rank in its metadata")
    return alpha / rank


def to_module_factors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, dict[str, tuple]]:
    """(format, {module name: (A, B)}) in diffusers module names, alphas folded in."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_z_image_lora_to_diffusers,
    )

    keys = list(tensors)
    if not keys:
        raise LoraError("contains no tensors")
    for marker, name in ((".lokr_", "LoKr"), ("dora_scale", "DoRA"), (".hada_", "LoHa")):
        if any(marker in k for k in keys):
            raise LoraError(f"is a {name} file; only LoRA is supported")
    fmt = _detect_format(keys)
    state = {k.removeprefix("base_model.model.").removeprefix("transformer."): v for k, v in tensors.items()}
    peft_scale = 1.0
    if fmt in ("diffusers", "peft") and not any(k.endswith(".alpha") for k in state):
        peft_scale = _peft_scale(metadata)
    else:
        try:  # diffusers' Z-Image converter: prefixes, kohya names, down/up, alphas, dotted forms
            state = _convert_non_diffusers_z_image_lora_to_diffusers(state)
        except (ValueError, KeyError, IndexError, RuntimeError) as err:
            missing = f" (missing {err.args[0]})" if isinstance(err, KeyError) else ""
            raise LoraError(f"has keys that are not a LoRA for Z-Image{missing}") from None
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if match is None:
            raise LoraError(f"has a key that is not a LoRA weight: {_short(key)}")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value
    factors: dict[str, tuple] = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LoraError(f"has lora_A without lora_B (or the reverse) for {_short(module)}")
        b_factor = pair["B"] * peft_scale if peft_scale != 1.0 else pair["B"]
        for name, a, b in _original_names(module, pair["A"], b_factor):
            if name in factors:
                raise LoraError(f"targets {_short(name)} twice")
            factors[name] = (a, b)
    return fmt, factors


def _original_names(module: str, a: torch.Tensor, b: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Z-Image's original checkpoint names (ComfyUI LoRAs): fused `attention.qkv` is split into
    to_q/to_k/to_v (A is shared, B is cut in three), `attention.out` is `attention.to_out.0`."""
    if module.endswith(".attention.qkv"):
        if b.ndim != 2 or b.shape[0] % 3:
            raise LoraError(f"has a fused qkv LoRA whose output size is not divisible by 3: {_short(module)}")
        block = module.removesuffix(".qkv")
        return [(f"{block}.to_{p}", a, chunk) for p, chunk in zip("qkv", b.chunk(3, dim=0))]
    if module.endswith(".attention.out"):
        return [(module.removesuffix(".out") + ".to_out.0", a, b)]
    return [(module, a, b)]


# -- validation ----------------------------------------------------------------------------------
def validate(factors: dict[str, tuple], targets: dict[str, nn.Module], max_rank: int, max_parameters: int) -> None:
    """Every rule a LoRA must meet before any of it is used; raises LoraError on the first broken one."""
    if not factors:
        raise LoraError("targets no layer")
    total = 0
    for module, (a, b) in factors.items():
        where = _short(module)
        layer = targets.get(module)
        if layer is None:
            if module.startswith(FLATTENED_INPUT_PREFIXES):
                raise LoraError(f"targets the input embedder {where}, which per-image LoRA does not support")
            raise LoraError(f"targets {where}, which is not a linear layer of this model")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise LoraError(f"has non-float weights for {where}")
        if a.ndim != 2 or b.ndim != 2:
            raise LoraError(f"has weights for {where} that are not matrices")
        rank = a.shape[0]
        if not 1 <= rank <= max_rank:
            raise LoraError(f"has rank {rank} for {where}; the limit is {max_rank}")
        out_features, in_features = layer.weight.shape
        if a.shape[1] != in_features or tuple(b.shape) != (out_features, rank):
            raise LoraError(
                f"has shapes A {tuple(a.shape)}, B {tuple(b.shape)} for {where}; the model needs "
                f"A (r, {in_features}), B ({out_features}, r)"
            )
        total += a.numel() + b.numel()
        if total > max_parameters:
            raise LoraError(f"has more than {max_parameters} parameters")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoraError(f"has non-finite weights for {where}")


def load_lora(
    data: bytes | Path, layers: MixedLoraLayers, max_rank: int = MAX_RANK, max_parameters: int = MAX_PARAMETERS,
    sha256: str | None = None,
) -> LoraAdapter:
    """Parse and validate a LoRA file for the installed transformer; LoraError if it does not fit."""
    if isinstance(data, Path):
        data = data.read_bytes()
    tensors, metadata = read_safetensors(data)
    fmt, factors = to_module_factors(tensors, metadata)
    validate(factors, layers.targets, max_rank, max_parameters)
    placed = {
        module: (a.to(layers.device, layers.dtype).contiguous(), b.to(layers.device, layers.dtype).contiguous())
        for module, (a, b) in factors.items()
    }
    return LoraAdapter(sha256 or hashlib.sha256(data).hexdigest(), fmt, placed)


def warm_up_adapter(layers: MixedLoraLayers, rank: int = MIN_PACKED_RANK) -> LoraAdapter:
    """An adapter on every hooked layer whose delta is zero (B = 0): warm-up runs the LoRA path
    (its compiled graphs) without changing a pixel."""
    factors = {
        name: (torch.zeros(rank, layer.in_features, device=layers.device, dtype=layers.dtype),
               torch.zeros(layer.out_features, rank, device=layers.device, dtype=layers.dtype))
        for name, layer in layers.targets.items()
    }
    return LoraAdapter("0" * 64, "warm-up", factors)


class LoraCache:
    """Loaded adapters by file sha256, bounded by count (LRU); `get_or_load` says whether it hit."""

    def __init__(self, capacity: int) -> None:
        self._entries: LRUCache = LRUCache(maxsize=max(capacity, 1))
        self._lock = threading.Lock()

    def get_or_load(self, sha256: str, load) -> tuple[LoraAdapter, bool]:
        """The cached adapter, or `load()`'s (cached when it succeeds; a LoraError is not cached)."""
        with self._lock:
            adapter = self._entries.get(sha256)
        if adapter is not None:
            return adapter, True
        adapter = load()
        with self._lock:
            self._entries[sha256] = adapter
        return adapter, False

    def __len__(self) -> int:
        return len(self._entries)


# -- the per-image low-rank path -----------------------------------------------------------------
_FACTORS = ("lora_down", "lora_up")


class _CallScales:
    """The one per-call tensor every hooked layer shares: (rows, R) scales, row r holding image
    r mod N's, for `rows` up to a fixed capacity. A compiled graph sees one shape whatever the
    batch (tensors reached from modules keep static shapes under compile); a layer takes the
    first x.shape[0] rows, which also covers CFG's doubled batch (images, then their negatives).
    `scales` is an instance attribute from the start: dynamo guards on where it is found, so a
    class default would make the first LoRA call change every graph's guards."""

    def __init__(self) -> None:
        self.scales: torch.Tensor | None = None


def _add_lora(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook, one function for every layer: it reads the layer's own (non-persistent)
    factor buffers and the shared scales, never the layer's name, so all repeated blocks trace to
    the same code and a compiled block's graph serves them all; new adapters are new tensor
    values, not new guards."""
    scales = module.lora_call.scales
    if scales is None:
        return output
    x = args[0]
    rows = x.shape[0]
    scales = scales[:rows].view(rows, *([1] * (x.dim() - 2)), -1)
    low = torch.nn.functional.linear(x, module.lora_down) * scales.to(x.dtype)
    return output + torch.nn.functional.linear(low, module.lora_up)


class MixedLoraLayers:
    """Forward hooks on the transformer's linear layers that add each image's own adapters."""

    def __init__(self, transformer: nn.Module, rank_floor: int, max_rows: int) -> None:
        self.targets: dict[str, nn.Linear] = {
            name: module
            for name, module in transformer.named_modules()
            if isinstance(module, nn.Linear) and not name.startswith(FLATTENED_INPUT_PREFIXES)
        }
        first = next(iter(self.targets.values()))
        self.device, self.dtype = first.weight.device, first.weight.dtype
        self.rank_floor, self.max_rows = rank_floor, max_rows
        self._call = _CallScales()
        self._stacked_key: tuple | None = None
        self._stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []
        self._lock = threading.Lock()

    @classmethod
    def install(
        cls, transformer: nn.Module, rank_floor: int = MIN_PACKED_RANK, max_rows: int = MAX_ROWS
    ) -> MixedLoraLayers:
        """Hook every targetable linear layer once, at engine load (before compile). `rank_floor`:
        the smallest stacked rank (a power of two); with compile, each larger power of two a batch
        needs is one recompile per block kind, so a floor at the usual rank (e.g. 64) saves them.
        `max_rows`: the most rows one forward has (2 x the largest batch, for CFG); a larger call
        still works, at one recompile."""
        layers = cls(transformer, rank_floor, max_rows)
        for module in layers.targets.values():
            for buffer in _FACTORS:
                module.register_buffer(buffer, None, persistent=False)
            module.lora_call = layers._call
            layers._handles.append(module.register_forward_hook(_add_lora))
        return layers

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stacked_key, self._stacked = None, {}
        for module in self.targets.values():
            for buffer in _FACTORS:
                module._buffers.pop(buffer, None)
            del module.lora_call

    @contextlib.contextmanager
    def active(self, per_image: Sequence[AdapterSet]) -> Iterator[None]:
        """Within the block, forwards of this transformer apply image b's (adapter, scale) pairs to
        row b (and to row b + k*len(per_image): the CFG copies). One generation at a time holds it;
        an empty or all-zero-scale call is exactly the base model."""
        with self._lock:
            try:
                self._set(per_image)
                yield
            finally:
                if self._call.scales is not None:  # a call without adapters set nothing (most calls)
                    self._call.scales = None
                    for module in self.targets.values():
                        module.lora_down = module.lora_up = None

    def _set(self, per_image: Sequence[AdapterSet]) -> None:
        """Stack the call's distinct adapters along the rank: adapter j owns ranks [o_j, o_j + r_j),
        zero where it does not target a layer; the total is padded to a power of two (at least
        `rank_floor`) so that the shapes a compiled graph sees repeat across calls. The stacks of
        the last set of adapters are kept: the scheduler runs a group's rows call after call with
        the same adapters, and only the per-row scales change between those calls."""
        distinct: dict[str, LoraAdapter] = {}
        for pairs in per_image:
            for adapter, scale in pairs:
                if scale != 0.0:
                    distinct.setdefault(adapter.sha256, adapter)
        if not distinct:
            return
        offsets, total = {}, 0
        for sha, adapter in distinct.items():
            offsets[sha], total = total, total + adapter.rank
        padded = max(self.rank_floor, 1 << (total - 1).bit_length())
        per_row = torch.zeros(len(per_image), padded, dtype=torch.float32)
        for row, pairs in enumerate(per_image):
            for adapter, scale in pairs:
                if scale != 0.0:
                    start = offsets[adapter.sha256]
                    per_row[row, start : start + adapter.rank] += scale
        rows = max(self.max_rows, 1 << (2 * len(per_image) - 1).bit_length())
        mask = per_row.repeat(-(-rows // len(per_image)), 1)[:rows].to(self.device)
        stacks = self._stacks(distinct, offsets, padded)
        self._call.scales = mask  # first: `active` clears the layers' factors whenever scales are set
        for name, (down, up) in stacks.items():
            layer = self.targets[name]
            layer.lora_down, layer.lora_up = down, up

    def _stacks(self, distinct: dict[str, LoraAdapter], offsets: dict[str, int],
                padded: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's stacked (down, up) factors for these adapters, in this order and padding."""
        key = (tuple((sha, adapter.rank) for sha, adapter in distinct.items()), padded)
        if self._stacked_key == key:
            return self._stacked
        self._stacked_key, self._stacked = None, {}  # the old stacks go before the new are built
        stacked = {}
        for name, layer in self.targets.items():
            out_features, in_features = layer.weight.shape
            down = torch.zeros(padded, in_features, device=self.device, dtype=self.dtype)
            up = torch.zeros(out_features, padded, device=self.device, dtype=self.dtype)
            for sha, adapter in distinct.items():
                factors = adapter.factors.get(name)
                if factors is not None:
                    a, b = factors
                    down[offsets[sha] : offsets[sha] + a.shape[0]] = a
                    up[:, offsets[sha] : offsets[sha] + a.shape[0]] = b
            stacked[name] = (down, up)
        self._stacked_key, self._stacked = key, stacked
        return stacked
