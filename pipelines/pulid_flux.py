"""Consistent mode: FLUX.1-dev with PuLID identity injection, served as rows like Z-Image.

Injection follows PuLID-FLUX: after double-stream blocks 0, 2, 4, ... and single-stream blocks
0, 4, 8, ... the image tokens get ``img + id_weight * ca(id_tokens, img)``. In diffusers 0.42.1 both
block kinds return ``(encoder_hidden_states, hidden_states)`` with the text and image tokens already
split (single blocks concatenate and split internally), so a forward hook can change the image
half alone and the transformer code stays untouched. Each row of a call has its own id tokens and
weight (0 before its `identity_start_step`), so images of different identities, steps and start
steps share calls.

The denoising loop is `FluxPipeline.__call__`'s, written as rows: its prompt encoding, packed
latents from each image's generator, flow-match Euler on its sigmas (linspace(1, 1/n, n) shifted by
`mu` from the image size), distilled guidance and timestep per row, then its unpacking and VAE
decode (tests/pipelines/test_pulid_flux.py checks the pixels against FluxPipeline). It implements
`pipelines.engine.Engine`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cachetools import LRUCache
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from models.eva_clip import EVAVisionConfig, EVAVisionTower, load_eva_state_dict
from models.face_parsing import BiSeNet, load_parsing_state_dict
from models.flux_pipeline import FluxPipeline, calculate_shift
from models.pulid_modules import IDFormer, PuLIDModules
from pipelines.acceleration import AccelerationReport, with_compile_fallback
from pipelines.engine import (
    BatchResult, ImageItem, ModelIdentity, Row, StageClock, StopCheck, call_model, generate_lockstep,
)
from pipelines.identity import FaceEncoder, IdentityCache, IdentityEmbedding, IdentityEncoder, image_key
from pipelines.samplers import euler

DOUBLE_INTERVAL = 2
SINGLE_INTERVAL = 4
PULID_WEIGHTS = "pulid/pulid_flux_v0.9.1.safetensors"
PARSING_WEIGHTS = "parsing_bisenet.pth"
# Peak activation memory per 1024² image, bf16: Z-Image's figure until a GPU measures FLUX's
# (docs/CONSISTENT_MODE.md); FLUX's distilled guidance runs one forward per step.
ACTIVATION_BYTES_PER_MEGAPIXEL = 4.5 * 2**30
T5_TOKENS = 512  # FluxPipeline's max_sequence_length: every prompt pads to it, so any rows share a call


@dataclass(frozen=True)
class PuLIDSpec:
    """What every image of one consistent-mode request shares: size, steps, guidance, identity."""

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


@dataclass(frozen=True)
class FluxConditioning:
    """A row's model inputs: T5 and CLIP prompt encodings, and its identity (None: plain FLUX)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    identity: torch.Tensor | None
    id_weight: float
    identity_start_step: int


class IdentityInjection:
    """Forward hooks on the FLUX blocks that add identity cross-attention to image tokens: row b of
    a call gets ``weights[b] * ca(tokens[b], img[b])``; with no tokens set the hooks do nothing."""

    def __init__(self, transformer: torch.nn.Module, ca_layers: torch.nn.ModuleList) -> None:
        hooked = [b for i, b in enumerate(transformer.transformer_blocks) if i % DOUBLE_INTERVAL == 0]
        hooked += [b for i, b in enumerate(transformer.single_transformer_blocks) if i % SINGLE_INTERVAL == 0]
        if len(hooked) != len(ca_layers):
            raise ValueError(f"transformer needs {len(hooked)} PuLID CA layers, checkpoint has {len(ca_layers)}")
        self.tokens: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        for block, ca in zip(hooked, ca_layers):
            block.register_forward_hook(self._hook(ca))

    def _hook(self, ca: torch.nn.Module) -> Callable:
        def add_identity(_module, _args, output):
            if self.tokens is None:
                return output
            text, img = output
            return text, img + self.weights * ca(self.tokens, img).to(img.dtype)

        return add_identity

    @contextmanager
    def active(self, tokens: torch.Tensor | None, weights: torch.Tensor | None) -> Iterator[None]:
        """One model call with these rows' tokens (B, n, d) and weights (B, 1, 1); always ends off."""
        self.tokens, self.weights = tokens, weights
        try:
            yield
        finally:
            self.tokens = self.weights = None


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
        self._schedules: LRUCache[tuple[int, int], torch.Tensor] = LRUCache(256)  # by (steps, packed tokens)

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
        """Rows of one size share calls: FLUX pads every prompt alike, and identity, its weight and
        start step, guidance and steps are per row."""
        return (spec.width, spec.height)

    def activation_bytes(self, spec: PuLIDSpec) -> float:
        return ACTIVATION_BYTES_PER_MEGAPIXEL * spec.width * spec.height / 2**20

    def model_calls(self, spec: PuLIDSpec) -> int:
        return spec.steps

    def numerics(self) -> dict[str, Any]:
        return {"dtype": str(self.flux.transformer.dtype), "fp8_layers": self.acceleration.fp8_layers}

    @torch.inference_mode()
    def start(self, items: list[ImageItem], spec: PuLIDSpec, clock: StageClock | None = None) -> list[Row]:
        """Rows for new images: prompts encoded in one batch (T5 and CLIP, as FluxPipeline does),
        packed noise from each image's generator, the size's shifted sigmas. All of it is the
        caller's `text_encoding`: nothing to lap on `clock`."""
        flux, device = self.flux, self.device
        prompt_embeds, pooled, _ = flux.encode_prompt(prompt=[item.prompt for item in items], prompt_2=None,
                                                      device=device, max_sequence_length=T5_TOKENS)
        use_identity = spec.identity is not None and spec.id_weight != 0
        sigmas = self._sigmas(spec.steps, spec.width, spec.height)
        channels = flux.transformer.config.in_channels // 4
        rows = []
        for i, item in enumerate(items):
            generator = torch.Generator(device).manual_seed(item.seed)
            latents, _ = flux.prepare_latents(1, channels, spec.height, spec.width, prompt_embeds.dtype, device,
                                              generator)
            conditioning = FluxConditioning(prompt_embeds[i : i + 1], pooled[i : i + 1],
                                            spec.identity.tokens if use_identity else None, spec.id_weight,
                                            spec.identity_start_step)
            rows.append(Row(euler(latents, sigmas), spec.steps, item, spec, conditioning))
        return rows

    @torch.inference_mode()
    def step(self, rows: list[Row]) -> None:
        """One FLUX transformer call over rows of one size, each at its own timestep with its own
        guidance, prompt and identity. A compile that fails turns the transformer eager and runs
        the call again (it changed no row)."""
        flux, spec = self.flux, rows[0].spec
        conditioning: list[FluxConditioning] = [row.conditioning for row in rows]
        dtype = conditioning[0].prompt_embeds.dtype
        height = 2 * (spec.height // (flux.vae_scale_factor * 2))
        width = 2 * (spec.width // (flux.vae_scale_factor * 2))
        image_ids = flux._prepare_latent_image_ids(len(rows), height // 2, width // 2, self.device, dtype)
        text_ids = torch.zeros(T5_TOKENS, 3, device=self.device, dtype=dtype)
        guidance = torch.tensor([row.spec.guidance_scale for row in rows], device=self.device, dtype=torch.float32)
        prompt_embeds = torch.cat([c.prompt_embeds for c in conditioning])
        pooled = torch.cat([c.pooled for c in conditioning])
        tokens, weights = self._identity(rows)

        def velocity(latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            timestep = (sigma.to(self.device) * 1000).to(latents.dtype)  # FluxPipeline's t, then / 1000
            return flux.transformer(hidden_states=latents, timestep=timestep / 1000,
                                    guidance=guidance if flux.transformer.config.guidance_embeds else None,
                                    pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                                    img_ids=image_ids, joint_attention_kwargs={}, return_dict=False)[0]

        with self.injection.active(tokens, weights):
            with_compile_fallback(lambda: call_model(rows, velocity), flux.transformer, self.acceleration)

    def _identity(self, rows: list[Row]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The call's id tokens and per-row weights: a row injects from its identity_start_step on
        (its step = calls made so far); None when no row of the call injects."""
        conditioning: list[FluxConditioning] = [row.conditioning for row in rows]
        on = [c.identity is not None and row.spec.steps - row.calls_left >= c.identity_start_step
              for row, c in zip(rows, conditioning)]
        if not any(on):
            return None, None
        like = next(c.identity for c, active in zip(conditioning, on) if active)
        tokens = torch.cat([c.identity if active else torch.zeros_like(like) for c, active in zip(conditioning, on)])
        weights = torch.tensor([c.id_weight if active else 0.0 for c, active in zip(conditioning, on)],
                               device=like.device, dtype=self.flux.transformer.dtype).view(-1, 1, 1)
        return tokens.to(self.flux.transformer.dtype), weights

    @torch.inference_mode()
    def finish(self, rows: list[Row]) -> np.ndarray:
        """FluxPipeline's decode: unpack, unscale, VAE, to uint8 HxWx3."""
        flux, spec = self.flux, rows[0].spec
        latents = FluxPipeline._unpack_latents(torch.cat([row.latents for row in rows]), spec.height, spec.width,
                                               flux.vae_scale_factor)
        latents = latents / flux.vae.config.scaling_factor + flux.vae.config.shift_factor
        images = flux.image_processor.postprocess(flux.vae.decode(latents, return_dict=False)[0], output_type="np")
        return (images * 255).round().clip(0, 255).astype(np.uint8)

    def generate(self, items: list[ImageItem], spec: PuLIDSpec, should_stop: StopCheck = lambda: False) -> BatchResult:
        """One image per item (its prompt and seed; FLUX takes no negative prompt), in lock-step."""
        return generate_lockstep(self, items, spec, should_stop)

    def _sigmas(self, steps: int, width: int, height: int) -> torch.Tensor:
        """FluxPipeline's schedule, from its own scheduler class: linspace(1, 1/n, n) shifted by the
        `mu` of the image's packed token count (dynamic shifting), then 0. Shared by rows."""
        tokens = (height // (self.flux.vae_scale_factor * 2)) * (width // (self.flux.vae_scale_factor * 2))
        sigmas = self._schedules.get((steps, tokens))
        if sigmas is None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.flux.scheduler.config)
            config = scheduler.config
            mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            sigmas = self._schedules[(steps, tokens)] = scheduler.sigmas.cpu()
        return sigmas

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
        should_stop: StopCheck = lambda: False,
    ) -> list[np.ndarray]:
        """One image per (prompt, seed): HxWx3 uint8. Each image depends only on its own seed.
        Raises `SamplingStopped` when `should_stop()` turns true between steps."""
        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds must have the same length")
        spec = PuLIDSpec(width, height, steps, guidance_scale, "", id_weight, identity_start_step, identity)
        items = [ImageItem(prompt, "", seed) for prompt, seed in zip(prompts, seeds)]
        return list(self.generate(items, spec, should_stop).images)
