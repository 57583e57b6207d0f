"""Consistent mode: FLUX.1-dev with PuLID identity injection.

Injection follows PuLID-FLUX: after double-stream blocks 0, 2, 4, ... and single-stream blocks
0, 4, 8, ... the image tokens get ``img + id_weight * ca(id_tokens, img)``. In diffusers 0.42.1 both
block kinds return ``(encoder_hidden_states, hidden_states)`` with the text and image tokens already
split (single blocks concatenate and split internally), so a forward hook can change the image
half alone and the transformer code stays untouched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from models.eva_clip import EVAVisionConfig, EVAVisionTower, load_eva_state_dict
from models.face_parsing import BiSeNet, load_parsing_state_dict
from models.pulid_modules import IDFormer, PuLIDModules
from pipelines.identity import FaceEncoder, IdentityCache, IdentityEmbedding, IdentityEncoder, image_key

DOUBLE_INTERVAL = 2
SINGLE_INTERVAL = 4
PULID_WEIGHTS = "pulid/pulid_flux_v0.9.1.safetensors"
PARSING_WEIGHTS = "parsing_bisenet.pth"


class Cancelled(RuntimeError):
    """``cancel_check`` asked to stop; no images are returned."""


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

    def __init__(self, flux: FluxPipeline, pulid: PuLIDModules, identity: IdentityEncoder, cache_size: int = 32) -> None:
        self.flux = flux
        self.pulid = pulid
        self.identity_encoder = identity
        self.injection = IdentityInjection(flux.transformer, pulid.pulid_ca)
        self.identity_cache = IdentityCache(cache_size)

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
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        faces = FaceEncoder(root / "insightface" / "models" / "antelopev2", providers)
        parser = _load_parser(root / "facexlib", device)
        eva = _load_eva(root / "eva", device, dtype)
        return cls(flux, pulid, IdentityEncoder(faces, parser, eva, pulid.pulid_encoder, device, dtype), cache_size)

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
    def generate(
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
        cancel_check: Callable[[], bool] | None = None,
    ) -> list[np.ndarray]:
        """One image per (prompt, seed): HxWx3 uint8. Each image depends only on its own seed."""
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
            if cancel_check is not None and cancel_check():
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
            raise Cancelled("generation cancelled")
        return [(image * 255).round().clip(0, 255).astype(np.uint8) for image in images]
