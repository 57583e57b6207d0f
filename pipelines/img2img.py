"""Image-to-image and inpainting: the pieces around the sampler, one image (row) at a time.

They are what diffusers' `ZImageImg2ImgPipeline` and `ZImageInpaintPipeline` (0.42) do before and
between sampler steps. An image-to-image row is an ordinary row (pipelines/engine.py) that starts
later: its sampler is given the schedule's tail and a start latent made from the init image, and
for inpainting a per-step hook (`Blend`); so these rows share model calls with text-to-image rows.

- `preprocess_image` / `preprocess_mask`: pixels to [-1, 1], a mask to 0/1 (1 = repaint), as
  their `VaeImageProcessor`s do; an image of another size than the output is scaled to cover it
  and centre-cropped (ours: diffusers would stretch it);
- `posteriors`: the VAE's latent distribution of each image, the images encoded in one call;
- `image_latents`: the VAE's latent distribution to model latents, `(z - shift) * scale`;
- `start_index`: where strength enters the simple schedule (`get_timesteps`);
- `noised`: the flow-matching forward process, `sigma * noise + (1 - sigma) * x0` (`scale_noise`);
- `simple_row_start`: one row's start latent drawn exactly as diffusers draws it from
  `generator=torch.Generator(device).manual_seed(seed)`: first the VAE sample, then the noise;
- `danrisi_schedule` / `danrisi_row_start`: the danrisi graph's start (docs/API.md, "Image to
  image"): RES4LYF's start sigma for denoise = strength, the graph's own noise, the VAE's mode;
- `latent_mask` and `Blend`: the inpainting blend after each step, the kept region put back at the
  step's end sigma with the row's start noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image, ImageOps

from pipelines.samplers import danrisi_start_noise

MASK_THRESHOLD = 0.5  # diffusers binarizes masks at half intensity: >= 0.5 repaints


@dataclass(frozen=True, eq=False)
class InitImage:
    """An image-to-image row's input, prepared on the CPU at the output size: pixels in [-1, 1]
    (1, 3, H, W), and for inpainting the repaint mask (1, 1, H, W) of 0/1 (1 = repaint)."""

    pixels: torch.Tensor
    mask: torch.Tensor | None = None


def _fitted(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled (Lanczos, the processors' filter) to cover width x height and centre-cropped, so a
    face is never stretched; an image already at that size is left as is."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def preprocess_image(rgb: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 RGB (H, W, 3) → float32 (1, 3, height, width) in [-1, 1]."""
    pixels = np.asarray(_fitted(Image.fromarray(rgb), width, height), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels.transpose(2, 0, 1)).unsqueeze(0) * 2.0 - 1.0


def preprocess_mask(rgb: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 RGB (H, W, 3) → float32 (1, 1, height, width) of 0/1: fitted first, then grey, then
    binarized at half intensity, in the mask processor's order (white = repaint)."""
    grey = _fitted(Image.fromarray(rgb), width, height).convert("L")
    mask = np.asarray(grey, dtype=np.float32) / 255.0
    return torch.from_numpy((mask >= MASK_THRESHOLD).astype(np.float32))[None, None]


def posteriors(vae, pixels: torch.Tensor) -> list[DiagonalGaussianDistribution]:
    """The VAE's latent distribution of each image of `pixels` (B, 3, H, W), encoded in one call,
    each on its own: a sample drawn from it with a generator is the one that image alone gives."""
    moments = vae.encode(pixels).latent_dist.parameters
    return [DiagonalGaussianDistribution(moments[i : i + 1]) for i in range(moments.shape[0])]


def image_latents(posterior, vae_config, generator: torch.Generator | None) -> torch.Tensor:
    """Model latents of an encoded image: a sample of the VAE's distribution drawn with
    `generator` (diffusers' img2img), or its mode when None (ComfyUI's VAEEncode), then shifted and
    scaled as the inverse of decoding."""
    z = posterior.sample(generator) if generator is not None else posterior.mode()
    return (z - vae_config.shift_factor) * vae_config.scaling_factor


def start_index(steps: int, strength: float) -> int:
    """The first of `steps` steps an image-to-image row runs: diffusers' `get_timesteps`, in its
    float arithmetic (strength 0.5 of 8 steps starts at step 4 and runs 4)."""
    return int(max(steps - min(steps * strength, steps), 0))


def noised(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The point at `sigma` on the straight path from `latents` (sigma 0) to `noise` (sigma 1),
    in the latents' dtype, as `FlowMatchEulerDiscreteScheduler.scale_noise` computes it."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.to(latents.device, latents.dtype)
    return sigma * noise + (1.0 - sigma) * latents


@dataclass(frozen=True)
class RowStart:
    """Where one row enters its schedule: its latent at the schedule's first sigma, and what the
    inpainting blend needs (the clean latents and the start noise), each (1, C, h, w)."""

    x: torch.Tensor
    latents: torch.Tensor
    noise: torch.Tensor

    def blend(self, mask: torch.Tensor | None) -> Blend | None:
        """The row's inpainting hook for a pixel `mask` (None: plain image to image, no hook)."""
        return None if mask is None else Blend(self.latents, self.noise, latent_mask(mask, self.latents))


def simple_row_start(posterior, vae_config, seed: int, sigma: torch.Tensor, device: torch.device) -> RowStart:
    """diffusers' draw for one image from its own generator: the VAE sample first, then the noise
    (the inpainting pipeline then encodes a masked image it never uses: a last draw, skipped)."""
    generator = torch.Generator(device).manual_seed(seed)
    latents = image_latents(posterior, vae_config, generator)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    return RowStart(noised(latents, noise, sigma), latents, noise)


def danrisi_schedule(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The danrisi schedule entered at RES4LYF's start for denoise = strength, sigmas[0] * strength
    (its sampler scales a given schedule by denoise), then the schedule's own sigmas below that:
    its tail, ending with the final call's sigma and 0. Strength 1 is the whole schedule."""
    start = sigmas[:1] * strength
    below = sigmas[:-1][sigmas[:-1] < start]
    return torch.cat([start, below, sigmas[-1:]])


def danrisi_row_start(posterior, vae_config, seed: int, sigma: float) -> RowStart:
    """The start as ComfyUI/RES4LYF form it from a VAE-encoded latent: sigma * noise + (1 - sigma)
    * latent, with the graph's start noise for the seed (`danrisi_start_noise`, as text-to-image)
    and the distribution's mode (ComfyUI's VAEEncode adds no noise since its PR #8705)."""
    latents = image_latents(posterior, vae_config, None).float()
    noise = danrisi_start_noise([seed], tuple(latents.shape)).to(latents)
    return RowStart(noised(latents, noise, sigma), latents, noise)


def latent_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The pixel mask at the latents' size (nearest, as diffusers), in their dtype and device."""
    return F.interpolate(mask, size=tuple(latents.shape[-2:]), mode="nearest").to(latents.device, latents.dtype)


@dataclass(frozen=True)
class Blend:
    """Inpainting after each step of one row (the sampler's `after_step`): the kept region (mask 0)
    is the clean latents re-noised to the step's end sigma with the row's start noise; the
    repainted region (mask 1) is the sampler's. At sigma 0 that is the clean latents themselves."""

    latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor

    def __call__(self, x: torch.Tensor, sigma_next: torch.Tensor | float) -> torch.Tensor:
        kept = noised(self.latents, self.noise, sigma_next)
        return (1 - self.mask) * kept + self.mask * x

