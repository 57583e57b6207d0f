"""Consistent mode: FLUX.1-dev with PuLID identity injection.

Injection follows PuLID-FLUX: after double-stream blocks 0, 2, 4, ... and single-stream blocks
0, 4, 8, ... the image tokens get ``img + id_weight * ca(id_tokens, img)``. In diffusers 0.42.1 both
block kinds return ``(encoder_hidden_states, hidden_states)`` with the text and image tokens already
split (single blocks concatenate and split internally), so a forward hook can change the image
half alone and the transformer code stays untouched. It implements `pipelines.engine.Engine`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Hashable

import numpy as np
import torch
from safetensors.torch import load_file

from models.eva_clip import EVAVisionConfig, EVAVisionTower, load_eva_state_dict
from models.face_parsing import BiSeNet, load_parsing_state_dict
from models.flux_pipeline import FluxPipeline
from models.pulid_modules import IDFormer, PuLIDModules
from pipelines.acceleration import AccelerationReport, with_compile_fallback
from pipelines.engine import BatchResult, ImageItem, ModelIdentity, SamplingStopped, StopCheck
from pipelines.identity import FaceEncoder, IdentityCache, IdentityEmbedding, IdentityEncoder, image_key

DOUBLE_INTERVAL = 2
SINGLE_INTERVAL = 4
PULID_WEIGHTS = "pulid/pulid_flux_v0.9.1.safetensors"
PARSING_WEIGHTS = "parsing_bisenet.pth"
# Peak activation memory per 1024² image, bf16: Z-Image's figure until a GPU measures FLUX's
# (docs/CONSISTENT_MODE.md); FLUX's distilled guidance runs one forward per step.
ACTIVATION_BYTES_PER_MEGAPIXEL = 4.5 * 2**30


@dataclass(frozen=True)
class PuLIDSpec:
    """What every image of one consistent-mode call shares: size, steps and the same identity."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    reference_sha256: str
    id_weight: float
    identity_start_step: int
    identity: IdentityEmbedding | None = field(compare=False, hash=False, repr=False)
    workflow: str = "pulid-flux"
    cfg = False  # FLUX.1-dev's guidance is distilled into the model: one forward, no negative prompt


def num_ca_layers(num_double: int, num_single: int) -> int:
    return math.ceil(num_double / DOUBLE_INTERVAL) + math.ceil(num_single / SINGLE_INTERVAL)


class IdentityInjection:
    """Forward hooks on the FLUX blocks that add identity cross-attention to image tokens."""

    def __init__(self, transformer: torch.nn.Module, ca_layers: torch.nn.ModuleList) -> None:
        hooked = [b for i, b in enumerate(transformer.transformer_blocks) if i % DOUBLE_INTERVAL == 0]
        hooked += [b for i, b in enumerate(transformer.single_transformer_blocks) if i % SINGLE_INTERVAL == 0]
        if len(hooked) != len(ca_layers):
            raise ValueError(f"transformer needs {len(hooked)} PuLID CA layers, checkpoint has {len(ca_layers)}")
        self.tokens: torch.Tensor | None = None
        self.weight = 0.0
        for block, ca in zip(hooked, ca_layers):
            block.register_forward_hook(self._hook(ca))

    def _hook(self, ca: torch.nn.Module) -> Callable:
        def add_identity(_module, _args, output):
            if self.tokens is None:
                return output
            text, img = output
            tokens = self.tokens.expand(img.shape[0], -1, -1)
            return text, img + self.weight * ca(tokens, img).to(img.dtype)

        return add_identity

    @contextmanager
    def run(self, weight: float) -> Iterator[None]:
        """One generation: starts off (``tokens`` is set when injection begins), always ends off."""
        self.tokens, self.weight = None, weight
        try:
            yield
        finally:
            self.tokens = None


def _optional_config(path: Path) -> dict:
    """A bundle's ``config.json`` overrides the published sizes (the demo bundle has one, the real bundle need not)."""
    return json.loads(path.read_text()) if path.exists() else {}


def _load_pulid(pulid_dir: Path, device: torch.device, dtype: torch.dtype) -> PuLIDModules:
    cfg = _optional_config(pulid_dir / "config.json")
    if cfg:
        encoder = IDFormer(**cfg.pop("encoder"))
        modules = PuLIDModules(encoder, **cfg)
    else:
        modules = PuLIDModules.flux_dev()
    modules.load_state_dict(load_file(pulid_dir.parent / PULID_WEIGHTS), strict=True)
    return modules.to(device, dtype).eval()


def _load_eva(eva_dir: Path, device: torch.device, dtype: torch.dtype) -> EVAVisionTower:
    tower = EVAVisionTower(EVAVisionConfig(**_optional_config(eva_dir / "config.json")))
    files = sorted(eva_dir.glob("*.safetensors"))
    if files:
        state = load_file(files[0])
    else:  # the EVA-CLIP release is a torch pickle of tensors only
        state = torch.load(next(eva_dir.glob("*.pt")), map_location="cpu", weights_only=True)
    load_eva_state_dict(tower, state)
    return tower.to(device, dtype).eval()


def _load_parser(parsing_dir: Path, device: torch.device) -> BiSeNet:
    """facexlib's BiSeNet, kept in float32 on the device (53 MB)."""
    parser = BiSeNet(**_optional_config(parsing_dir / "config.json"))
    load_parsing_state_dict(parser, torch.load(parsing_dir / PARSING_WEIGHTS, map_location="cpu", weights_only=True))
    return parser.to(device).eval()


class PuLIDFluxPipeline:
    """FLUX.1-dev + PuLID. Load once, then ``compute_identity`` per reference and ``generate`` per batch."""

    name = "pulid-flux"
    fp8_blocks = ("transformer_blocks", "single_transformer_blocks")

    def __init__(self, flux: FluxPipeline, pulid: PuLIDModules, identity: IdentityEncoder, cache_size: int = 32,
                 model_identity: ModelIdentity | None = None) -> None:
        self.flux = flux
        self.pulid = pulid
        self.identity_encoder = identity
        self.injection = IdentityInjection(flux.transformer, pulid.pulid_ca)
        self.identity_cache = IdentityCache(cache_size)
        self.identity = model_identity or ModelIdentity("pulid-flux", "unknown", demo=False)
        self.device = flux.transformer.device
        self.acceleration = AccelerationReport()

    @classmethod
    def load(
        cls, model_dir: str | Path, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
        cache_size: int = 32,
    ) -> PuLIDFluxPipeline:
        """Load a bundle laid out as in docs/CONSISTENT_MODE.md (real weights or the tiny demo)."""
        root, device = Path(model_dir), torch.device(device)
        flux = FluxPipeline.from_pretrained(root / "flux", dtype=dtype).to(device)
        flux.set_progress_bar_config(disable=True)
        pulid = _load_pulid(root / "pulid", device, dtype)
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        )
        faces = FaceEncoder(root / "insightface" / "models" / "antelopev2", providers)
        parser = _load_parser(root / "facexlib", device)
        eva = _load_eva(root / "eva", device, dtype)
        info = _optional_config(root / "model_info.json")
        identity = ModelIdentity(
            info.get("id", str(root)), info.get("revision", "unknown"), bool(info.get("demo", False))
        )
        encoder = IdentityEncoder(faces, parser, eva, pulid.pulid_encoder, device, dtype)
        return cls(flux, pulid, encoder, cache_size, identity)

    # -- the Engine interface (pipelines/engine.py) ------------------------------------------------
    def batch_key(self, spec: PuLIDSpec, item: ImageItem) -> Hashable:
        """One identity per call: the spec holds it (FLUX pads every prompt alike)."""
        return spec

    def activation_bytes(self, spec: PuLIDSpec) -> float:
        return ACTIVATION_BYTES_PER_MEGAPIXEL * spec.width * spec.height / 2**20

    def numerics(self) -> dict[str, Any]:
        return {"dtype": str(self.flux.transformer.dtype), "fp8_layers": self.acceleration.fp8_layers}

    def generate(self, items: list[ImageItem], spec: PuLIDSpec, should_stop: StopCheck = lambda: False) -> BatchResult:
        """One image per item (its prompt and seed; FLUX takes no negative prompt). A compile that
        fails turns the transformer eager and renders again from the same seeds."""
        started = time.perf_counter()
        images = with_compile_fallback(lambda: self.render(
            [item.prompt for item in items], [item.seed for item in items], spec.width, spec.height, spec.steps,
            spec.guidance_scale, spec.identity, spec.id_weight, spec.identity_start_step, should_stop,
        ), self.flux.transformer, self.acceleration)
        return BatchResult(np.stack(images), {"denoising": round((time.perf_counter() - started) * 1000, 2)})

    def blank_identity(self) -> IdentityEmbedding:
        """Id tokens of the right shape and no face (zeros): for warm-up, which must trace the
        identity hooks without a reference photo."""
        encoder = self.pulid.pulid_encoder
        weight = encoder.proj_out
        tokens = torch.zeros(1, encoder.num_queries, weight.shape[1], device=weight.device, dtype=weight.dtype)
        return IdentityEmbedding(tokens=tokens, bbox=(0.0, 0.0, 0.0, 0.0))

    def compute_identity(self, reference_rgb: np.ndarray) -> IdentityEmbedding:
        """Id tokens for the single face in an RGB uint8 photo; raises ``NoFace`` / ``MultipleFaces``."""
        key = image_key(reference_rgb)
        cached = self.identity_cache.get(key)
        if cached is not None:
            return cached
        embedding = self.identity_encoder.encode(reference_rgb)
        self.identity_cache.put(key, embedding)
        return embedding

    @torch.inference_mode()
    def render(
        self,
        prompts: list[str],
        seeds: list[int],
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        identity: IdentityEmbedding | None,
        id_weight: float = 1.0,
        identity_start_step: int = 0,
        should_stop: StopCheck | None = None,
    ) -> list[np.ndarray]:
        """One image per (prompt, seed): HxWx3 uint8. Each image depends only on its own seed.
        Raises `SamplingStopped` when `should_stop()` turns true between steps."""
        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds must have the same length")
        device = self.flux.transformer.device
        generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        use_identity = identity is not None and id_weight != 0
        injection = self.injection

        def on_step_end(pipe: FluxPipeline, step: int, _timestep, tensors: dict) -> dict:
            # the hooks read the tokens from step `identity_start_step` on (step + 1 runs next)
            if use_identity and step + 1 >= identity_start_step:
                injection.tokens = identity.tokens
            if should_stop is not None and should_stop():
                pipe._interrupt = True
            return tensors

        with injection.run(id_weight):
            if use_identity and identity_start_step <= 0:
                injection.tokens = identity.tokens
            images = self.flux(
                prompt=prompts,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="np",
                callback_on_step_end=on_step_end,
            ).images
        if self.flux.interrupt:
            raise SamplingStopped("generation cancelled")
        return [(image * 255).round().clip(0, 255).astype(np.uint8) for image in images]
