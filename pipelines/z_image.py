"""The Z-Image engine: the warm model, serving rows (images in flight) one model call at a time.

It holds one diffusers `ZImagePipeline` (loaded once, from a local diffusers-format folder) and
runs its components directly: `start` encodes the prompts (cached) and draws each image's noise
(or, for image to image, encodes its init image: a row that starts part-way down its schedule),
`step` runs one transformer call over any rows of one batch key (each at its own sigma, with its
own sampler, guidance, LoRAs and strength), `finish` decodes. The simple workflow reproduces
`ZImagePipeline.__call__` (tests/pipelines/test_z_image.py checks the pixels), the danrisi
workflow the users' ComfyUI graph. It implements `pipelines.engine.Engine`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from collections.abc import Hashable

import numpy as np
import torch

from models.z_image_demo import MODEL_INFO_FILE
from pipelines.acceleration import AccelerationReport, with_compile_fallback
from pipelines.counting_cache import CountingLRU
from pipelines.engine import (
    BatchResult, ImageItem, ModelIdentity, Row, StageClock, StopCheck, call_model, generate_lockstep,
)
from pipelines.img2img import (
    Blend, RowStart, danrisi_row_start, danrisi_schedule, posteriors, simple_row_start, start_index,
)
from pipelines.lora import MixedLoraLayers
from pipelines.samplers import (
    danrisi, danrisi_calls, danrisi_sigmas, danrisi_start_noise, euler, euler_calls, simple_sigmas,
)

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 512
CAPTION_PAD = 32  # ZImageTransformer2DModel pads each caption to a multiple of this
WORKFLOWS = ("z-image-simple", "z-image-danrisi")


# Peak activation memory per 1024² image at 8 steps, batch 1, bf16 (REFERENCE: 24.5 GB peak with
# 20.9 GB of weights), with headroom: the batch limit divides free GPU memory by it.
ACTIVATION_BYTES_PER_MEGAPIXEL = 4.5 * 2**30


def read_model_identity(model_dir: Path) -> ModelIdentity:
    """The identity the builder (or the demo builder) wrote beside the weights; the folder name else."""
    info_path = Path(model_dir) / MODEL_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return ModelIdentity(
        id=info.get("id", Path(model_dir).name),
        revision=info.get("revision", "unknown"),
        demo=bool(info.get("demo", False)),
    )


@dataclass(frozen=True)
class BatchSpec:
    """What every image of one request shares (rows of different specs may still share a model
    call: only `batch_key` decides)."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    workflow: str
    eta: float | None = None  # danrisi's SDE noise share; the simple workflow has none
    strength: float | None = None  # image to image: how far down its schedule each image starts

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance: a second forward per step, on the negative prompt."""
        return self.guidance_scale > 0


@dataclass(frozen=True)
class TextConditioning:
    """A row's text encodings (unpadded token rows): its prompt's and, with CFG, its negative's."""

    text: torch.Tensor
    negative: torch.Tensor | None


@cache
def sigma_schedule(workflow: str, steps: int, shift: float) -> torch.Tensor:
    """The workflow's sigmas (shared, never written to: the samplers build new tensors)."""
    return danrisi_sigmas(steps, shift) if workflow == "z-image-danrisi" else simple_sigmas(steps, shift)


def padded_caption_length(tokens: int) -> int:
    """The length ZImageTransformer2DModel pads a caption of `tokens` tokens to."""
    return -(-tokens // CAPTION_PAD) * CAPTION_PAD


def serving_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA (the weights' own precision); float32 on CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def pick_device(preference: str) -> str:
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


class ZImageEngine:
    """One warm Z-Image pipeline: rows started, stepped one model call at a time, decoded."""

    name = "z-image"
    fp8_blocks = ("layers",)  # the main blocks; the refiners stay bf16

    def __init__(self, pipe, identity: ModelIdentity, device: str, prompt_cache_size: int) -> None:
        self.pipe = pipe
        self.identity = identity
        self.device = torch.device(device)
        self.dtype = pipe.transformer.dtype
        self.prompt_cache: CountingLRU[torch.Tensor] = CountingLRU(prompt_cache_size)  # by exact text
        self.load_seconds = 0.0
        self.startup_ms: dict[str, float] = {}
        self.acceleration = AccelerationReport()
        # per-image LoRA hooks, installed before any compile: each image's adapters apply to it alone
        self.lora_layers = MixedLoraLayers.install(pipe.transformer)

    @classmethod
    def load(cls, model_dir: Path, device: str, prompt_cache_size: int = 256) -> ZImageEngine:
        """Load from a local diffusers folder: bf16 on CUDA, float32 on CPU; never the network.
        Speed switches come after, from pipelines/startup.py."""
        from diffusers import ZImagePipeline

        started = time.perf_counter()
        dtype = serving_dtype(device)
        pipe = ZImagePipeline.from_pretrained(model_dir, dtype=dtype, local_files_only=True, device_map=device)
        pipe.set_progress_bar_config(disable=True)
        engine = cls(pipe, read_model_identity(model_dir), device, prompt_cache_size)
        engine.load_seconds = time.perf_counter() - started
        log.info(
            "loaded Z-Image %s@%s on %s (%s) in %.2f s%s",
            engine.identity.id, engine.identity.revision, device, dtype, engine.load_seconds,
            " — DEMO MODEL with random weights: images are noise" if engine.identity.demo else "",
        )
        return engine

    # -- the Engine interface (pipelines/engine.py) ------------------------------------------------
    def batch_key(self, spec: BatchSpec, item: ImageItem) -> Hashable:
        """Rows share a model call when their latents have one shape and their texts pad alike, so
        the call runs the model on the same token layout as each row alone (no cross-image
        attention padding), and CFG is on for all or none. Steps, sampler, guidance scale, eta,
        LoRAs, strength and an inpainting mask are per row: danrisi and simple rows, image to image
        and text to image rows of one size share calls."""
        texts = [item.prompt] + ([item.negative_prompt] if spec.cfg else [])
        return (spec.width, spec.height, spec.cfg, tuple(self.text_length_bucket(t) for t in texts))

    def activation_bytes(self, spec: BatchSpec) -> float:
        """Peak activation memory of one image of `spec` on the GPU (CFG runs a second forward)."""
        return ACTIVATION_BYTES_PER_MEGAPIXEL * spec.width * spec.height / 2**20 * (2 if spec.cfg else 1)

    def model_calls(self, spec: BatchSpec) -> int:
        sigmas = self.sigmas(spec)
        return danrisi_calls(sigmas) if spec.workflow == "z-image-danrisi" else euler_calls(sigmas)

    def sigmas(self, spec: BatchSpec) -> torch.Tensor:
        """The schedule a row of `spec` runs: the workflow's, or for image to image its tail from
        where the strength enters it (simple: diffusers' `get_timesteps`; danrisi: RES4LYF's start)."""
        sigmas = sigma_schedule(spec.workflow, spec.steps, float(self.pipe.scheduler.config.get("shift", 3.0)))
        if spec.strength is None:
            return sigmas
        if spec.workflow == "z-image-danrisi":
            return danrisi_schedule(sigmas, spec.strength)
        return sigmas[start_index(spec.steps, spec.strength):]

    def numerics(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype), "fp8_layers": self.acceleration.fp8_layers}

    def move_text_encoder_to_cpu(self, reason: str) -> None:
        """Qwen3-4B (≈7.5 GiB in bf16) to the CPU: new prompts then encode there, in seconds, and are
        cached; the GPU memory goes to the batch."""
        self.pipe.text_encoder.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.acceleration.text_encoder_device = "cpu"
        self.acceleration.notes.append(f"text encoder on the CPU: {reason}")
        log.warning("text encoder on the CPU (%s): each new prompt takes seconds to encode", reason)

    # -- stage 1: text --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Text encodings (unpadded token rows), batched over the prompts not in the cache."""
        found = {text: self.prompt_cache.get(text) for text in dict.fromkeys(prompts)}
        missing = [text for text, value in found.items() if value is None]
        if missing:
            for text, value in zip(missing, self._encode_uncached(missing)):
                self.prompt_cache.put(text, value)
                found[text] = value
        return [found[text] for text in prompts]

    def _chat(self, prompt: str) -> str:
        return self.pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )

    def text_length_bucket(self, prompt: str) -> int:
        """The caption length the transformer pads this prompt to (a multiple of 32 tokens)."""
        tokens = len(self.pipe.tokenizer(self._chat(prompt), max_length=MAX_TEXT_TOKENS, truncation=True).input_ids)
        return padded_caption_length(tokens)

    def _encode_uncached(self, prompts: list[str]) -> list[torch.Tensor]:
        tokenizer = self.pipe.tokenizer
        chats = [self._chat(p) for p in prompts]
        # Pad to the longest prompt, not to 512: the encoder is causal, so padding changes nothing
        # in the kept rows, and short prompts skip hundreds of wasted token positions.
        tokens = tokenizer(chats, padding="longest", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt")
        encoder = self.pipe.text_encoder  # on the GPU, or kept on the CPU by TEXT_ENCODER_DEVICE=cpu
        ids = tokens.input_ids.to(encoder.device)
        mask = tokens.attention_mask.to(encoder.device).bool()
        hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [hidden[i][mask[i]].to(self.device, self.dtype) for i in range(len(prompts))]

    # -- stage 2: latents -----------------------------------------------------------------------
    def initial_noise(
        self, seeds: list[int], width: int, height: int, workflow: str = "z-image-simple"
    ) -> torch.Tensor:
        """Per-image generators, so image i's noise is the same whatever batch it runs in: diffusers'
        draw for the simple workflow, the ComfyUI graph's (RES4LYF's, on the CPU) for danrisi."""
        scale = self.pipe.vae_scale_factor
        shape = (1, self.pipe.transformer.in_channels, 2 * (height // (scale * 2)), 2 * (width // (scale * 2)))
        if workflow == "z-image-danrisi":
            return danrisi_start_noise(seeds, shape).float().to(self.device)
        noises = [
            torch.randn(shape, generator=torch.Generator(self.device).manual_seed(seed), device=self.device)
            for seed in seeds
        ]
        return torch.cat(noises).float()

    def velocity_function(self, text: list[torch.Tensor], negative: list[torch.Tensor] | None,
                          guidance: float | torch.Tensor):
        """v(x, sigma) as ZImagePipeline computes it (sigma: one per row), with classifier-free
        guidance when asked (`guidance`: one scale, or one per row shaped (B, 1, 1, 1)).

        The transformer masks attention only when a batch's captions pad to different lengths.
        Rows of one batch key pad alike, so only CFG can mix them (prompt vs negative prompt);
        then the two halves run as two unmasked calls instead of one masked call, which keeps
        every forward on the fast (mask-free) attention kernel and its compiled graph.
        """
        transformer = self.pipe.transformer
        captions = text + (negative or [])
        one_layout = len({padded_caption_length(len(c)) for c in captions}) == 1

        def forward(latents: torch.Tensor, model_t: torch.Tensor, embeds: list[torch.Tensor]) -> torch.Tensor:
            out = transformer(list(latents.unsqueeze(2).unbind(0)), model_t, embeds, return_dict=False)[0]
            return torch.stack([o.float() for o in out]).squeeze(2)

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            batch = x.shape[0]
            # the pipeline's timestep arithmetic, in float32: t = sigma*1000, model sees (1000 - t)/1000
            model_t = ((1000 - sigma.to(x.device) * 1000) / 1000).expand(batch)
            latents = x.to(self.dtype)
            if negative is None:
                return -forward(latents, model_t, text)
            if one_layout:
                both = forward(latents.repeat(2, 1, 1, 1), model_t.repeat(2), text + negative)
                positive, negative_out = both[:batch], both[batch:]
            else:
                positive, negative_out = forward(latents, model_t, text), forward(latents, model_t, negative)
            return -(positive + guidance * (positive - negative_out))

        return velocity

    def make_rows(self, x: torch.Tensor, text: list[torch.Tensor], negative: list[torch.Tensor] | None,
                  items: list[ImageItem], spec: BatchSpec, blends: list[Blend | None] | None = None) -> list[Row]:
        """One row per item from its latent at the first sigma of its schedule (x[i]: sigma_0 times
        its noise, or an image-to-image row's noised init latent on the schedule's tail) and its
        encodings, its sampler set at that first sigma; `blends[i]`, inpainting's hook, runs after
        each of its steps."""
        sigmas = self.sigmas(spec)
        rows = []
        for i, item in enumerate(items):
            after_step = blends[i] if blends is not None else None
            if spec.workflow == "z-image-danrisi":
                sampler = danrisi(x[i : i + 1], sigmas, item.seed, spec.eta, after_step)
                calls = danrisi_calls(sigmas)
            else:
                sampler, calls = euler(x[i : i + 1], sigmas, after_step), euler_calls(sigmas)
            conditioning = TextConditioning(text[i], negative[i] if negative is not None else None)
            rows.append(Row(sampler, calls, item, spec, conditioning))
        return rows

    @torch.no_grad()
    def start(self, items: list[ImageItem], spec: BatchSpec, clock: StageClock | None = None) -> list[Row]:
        """Rows for new images: their prompts encoded in one batch (cached), then their noise drawn,
        or for image to image (`spec.strength`) their init images encoded (lapped as
        `vae_encoding`) and noised to where the strength enters the schedule."""
        clock = clock or StageClock(self.device)
        text = self.encode_prompts([item.prompt for item in items])
        negative = self.encode_prompts([item.negative_prompt for item in items]) if spec.cfg else None
        if spec.strength is None:
            noise = self.initial_noise([item.seed for item in items], spec.width, spec.height, spec.workflow)
            return self.make_rows(float(self.sigmas(spec)[0]) * noise, text, negative, items, spec)
        clock.lap("text_encoding")
        starts = self.image_starts(items, spec)
        clock.lap("vae_encoding")
        blends = [start.blend(item.init.mask) for start, item in zip(starts, items)]
        return self.make_rows(torch.cat([start.x for start in starts]).float(), text, negative, items, spec, blends)

    # -- image to image and inpainting (pipelines/img2img.py) --------------------------------------
    @torch.no_grad()
    def image_starts(self, items: list[ImageItem], spec: BatchSpec) -> list[RowStart]:
        """Each image-to-image row's start at the first sigma of its schedule tail: the distinct init
        images of these rows encoded in one VAE call (a job's variations share theirs), each row's
        latents and noise drawn from its own seed as diffusers (simple) or the graph (danrisi) does."""
        vae = self.pipe.vae
        distinct = {id(item.init): item.init for item in items}
        pixels = torch.cat([init.pixels for init in distinct.values()]).to(self.device, vae.dtype)
        encoded = dict(zip(distinct, posteriors(vae, pixels)))
        sigma = self.sigmas(spec)[0]
        starts = []
        for item in items:
            posterior = encoded[id(item.init)]
            if spec.workflow == "z-image-danrisi":
                starts.append(danrisi_row_start(posterior, vae.config, item.seed, float(sigma)))
            else:
                starts.append(simple_row_start(posterior, vae.config, item.seed, sigma, self.device))
        return starts

    @torch.no_grad()
    def step(self, rows: list[Row]) -> None:
        """One transformer call (two halves with CFG) over rows of one batch key, each row at its
        own sigma with its own guidance scale and LoRAs. If the compiled blocks fail to compile (a
        shape first seen here), the engine turns eager for good and runs the call again: it
        changed no row."""
        conditioning: list[TextConditioning] = [row.conditioning for row in rows]
        negative = [c.negative for c in conditioning] if rows[0].spec.cfg else None
        guidance = torch.tensor([row.spec.guidance_scale for row in rows], device=self.device).view(-1, 1, 1, 1)
        velocity = self.velocity_function([c.text for c in conditioning], negative, guidance)
        with self.lora_layers.active([row.item.loras for row in rows]):
            with_compile_fallback(lambda: call_model(rows, velocity), self.pipe.transformer, self.acceleration)

    # -- stage 3: pixels ------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents → uint8 RGB (B, H, W, 3), the whole batch in one VAE call."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        pixels = vae.decode(latents, return_dict=False)[0]
        pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    def finish(self, rows: list[Row]) -> np.ndarray:
        return self.decode(torch.cat([row.latents for row in rows]))

    def generate(self, items: list[ImageItem], spec: BatchSpec, should_stop: StopCheck = lambda: False) -> BatchResult:
        """The images of `items` together, start to pixels (`generate_lockstep`)."""
        return generate_lockstep(self, items, spec, should_stop)

    def generate_fixed(self, prompt: str, count: int, width: int, height: int, steps: int,
                       loras: tuple[tuple[Any, float], ...] = ()) -> BatchResult:
        """`count` images of one prompt, seeds 0..count-1, no CFG, the simple workflow: the fixed
        batches of the warm-up, the FP8 guard and the benchmarks."""
        items = [ImageItem(prompt, "", seed, loras) for seed in range(count)]
        return self.generate(items, BatchSpec(width, height, steps, 0.0, "z-image-simple"))
