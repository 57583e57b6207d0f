"""Sigma schedules and samplers for a flow-matching model.

A sampler sees the model only through the flow velocity v = dx/dsigma at the points it asks for
(Z-Image's transformer output, negated); the denoised estimate is D = x - sigma * v. Each sampler
is written for ONE image as a generator (`v = yield x, sigma`), so its state (latents, position in
its schedule, danrisi's substep and SDE noise generators) lives in its frame and it can pause at
any model call: the engine drives many such rows through one model call (pipelines/engine.py).
`sample_euler` and `sample_danrisi` run a batch of them in lock-step on a `velocity(x, sigma)`.
The simple schedule is float32 and its Euler step is done in float32, exactly as diffusers'
scheduler does it, so the simple workflow matches `ZImagePipeline` pixel for pixel. The danrisi
schedule and sampler reproduce the users' ComfyUI graph (RES4LYF's linear/ralston_2s).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from itertools import pairwise

import numpy as np
import torch
from scipy.stats import beta as beta_distribution

from pipelines.engine import Row, RowSampler, StopCheck, Velocity, call_model, run_lockstep

# A row's own update after each step: x at the step's end and that sigma -> x (inpainting's blend
# of the kept region, pipelines/img2img.py). After the last step the sigma is 0.
StepHook = Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The static time shift of Z-Image's scheduler: s -> shift*s / (1 + (shift-1)*s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _with_terminal_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), torch.zeros(1)])


def simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """diffusers 0.42's Z-Image schedule: linspace(1, 1/n, n), shifted, then 0. n model calls."""
    return _with_terminal_zero(shift_sigmas(torch.linspace(1.0, 1.0 / steps, steps), shift))


def euler(x: torch.Tensor, sigmas: torch.Tensor, after_step: StepHook | None = None) -> RowSampler:
    """Flow-match Euler for one image from `x` at sigmas[0]: one model call per step, each update
    as diffusers' FlowMatchEulerDiscreteScheduler.step makes it (x in float32 plus dt times the
    model's output, stored in the output's dtype: float32 for Z-Image, the model's for FLUX), then
    `after_step` when given. An image-to-image row is the same sampler on the schedule's tail."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = yield x, sigma
        x = (x.float() + (sigma_next - sigma) * v).to(v.dtype)
        if after_step is not None:
            x = after_step(x, sigma_next)
    return x


def euler_calls(sigmas: torch.Tensor) -> int:
    return len(sigmas) - 1


def _lockstep(rows: list[Row], velocity: Velocity, should_stop: StopCheck) -> torch.Tensor:
    run_lockstep(rows, partial(call_model, velocity=velocity), should_stop)
    return torch.cat([row.latents for row in rows])


def sample_euler(x: torch.Tensor, sigmas: torch.Tensor, velocity: Velocity, should_stop: StopCheck) -> torch.Tensor:
    """`euler` for each image of the batch `x`, in lock-step."""
    rows = [Row(euler(x[i : i + 1], sigmas), euler_calls(sigmas)) for i in range(x.shape[0])]
    return _lockstep(rows, velocity, should_stop)


# -- the danrisi workflow ------------------------------------------------------------------------
# The users' ComfyUI graph: BetaSamplingScheduler (alpha = beta = 0.4) -> Sigmas Rescale (0.996 -> 0)
# -> RES4LYF's ClownsharKSampler_Beta (commit 46de917): sampler linear/ralston_2s, noise mode "hard",
# eta_substep = eta, bongmath on, cfg 1. Written from RES4LYF's and ComfyUI's source; the tests replay
# RES4LYF's own stepping on a toy model with an exact denoiser.
DANRISI_ETA = 0.5
DANRISI_REFERENCE_STEPS = 20  # the public graph's step count
BETA_SCHEDULE_SHAPE = 0.4  # the graph's alpha and beta
DANRISI_SIGMA_START = 0.996  # Sigmas Rescale's start
FLOW_TIMESTEPS = 1000  # ComfyUI's discrete flow table for Z-Image
SIGMA_MIN_TOLERANCE = 1e-4  # RES4LYF's prepare_sigmas inserts sigma_min unless the schedule ends this close
RALSTON_C2 = 2 / 3  # ralston_2s: a21 = c2 = 2/3, weights 1/4 and 3/4
RALSTON_WEIGHTS = (1 / 4, 3 / 4)
BONGMATH_ABOVE_SIGMA = 0.03  # RES4LYF re-solves the step's start only while sigma > 0.03
MAX_NOISE_SHARE = 0.9999  # "hard" noise at eta >= 1: RES4LYF uses this share instead, not all of sigma
STEP_SEED_OFFSET = 1  # ClownsharKSampler's SDE seed is the graph's seed + 1 ...
SUBSTEP_SEED_OFFSET = 1 + 10000  # ... and its substep stream is offset by RES4LYF's MAX_STEPS


def flow_sigma_table(shift: float) -> torch.Tensor:
    """ComfyUI's ModelSamplingDiscreteFlow sigmas for a model with this shift (float32, ascending):
    sigma_i = shift((i + 1) / 1000). Its first entry is the model's sigma_min."""
    return shift_sigmas(torch.arange(1, FLOW_TIMESTEPS + 1) / FLOW_TIMESTEPS, shift)


def danrisi_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The schedule the danrisi graph samples (float64, as RES4LYF holds it), ending sigma_min, 0.

    ComfyUI's beta_scheduler picks table entries at beta(0.4, 0.4) quantiles (repeats dropped),
    Sigmas Rescale maps them onto 0.996..0 in float32, and RES4LYF's prepare_sigmas puts the
    model's sigma_min before the final 0, where the sampler makes its last model call.
    """
    table = flow_sigma_table(shift)
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    picked = np.rint(beta_distribution.ppf(quantiles, BETA_SCHEDULE_SHAPE, BETA_SCHEDULE_SHAPE) * (len(table) - 1))
    indices = [int(i) for n, i in enumerate(picked) if n == 0 or i != picked[n - 1]]
    scheduled = torch.cat([table[indices], torch.zeros(1)])
    low, high = scheduled.min(), scheduled.max()
    sigmas = ((scheduled - low) * DANRISI_SIGMA_START / (high - low)).double()
    sigma_min = table[:1].double()
    if sigmas[-2] - sigma_min > SIGMA_MIN_TOLERANCE:
        return torch.cat([sigmas[:-1], sigma_min, sigmas[-1:]])
    # RES4LYF raises a lower end to sigma_min; one within 1e-4 of it (never the case for 1..50
    # steps at shift 3) we also snap, so the schedule always ends on the final call's sigma
    sigmas[-2] = sigma_min
    return sigmas


def _normalised_gaussian(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """RES4LYF's gaussian noise for one image: float64, z-scored over the image, then per channel."""
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    z = (z - z.mean()) / z.std()
    return (z - z.mean(dim=(-2, -1), keepdim=True)) / z.std(dim=(-2, -1), keepdim=True)


def danrisi_start_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """The graph's unit start noise, float64, one row per seed: RES4LYF draws it like its SDE noise,
    on a CPU generator seeded with the image's seed (the latent is still on the CPU then), and
    re-centres it once more."""
    rows = [_normalised_gaussian(torch.Generator().manual_seed(seed), (1, *shape[1:])) for seed in seeds]
    return torch.cat([row - row.mean() for row in rows])


class _SdeNoise:
    """RES4LYF's two noise streams for one image: CPU generators seeded seed + 1 (the steps) and
    seed + 10001 (the substeps), each draw cast to the latent's dtype and device at the end."""

    def __init__(self, seed: int, like: torch.Tensor) -> None:
        self.like = like
        self.step_generator = torch.Generator().manual_seed(seed + STEP_SEED_OFFSET)
        self.substep_generator = torch.Generator().manual_seed(seed + SUBSTEP_SEED_OFFSET)

    def step(self) -> torch.Tensor:
        return self._draw(self.step_generator)

    def substep(self) -> torch.Tensor:
        return self._draw(self.substep_generator)

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        return _normalised_gaussian(generator, tuple(self.like.shape)).to(self.like.dtype).to(self.like.device)


def _renoise(denoised: torch.Tensor, eps: torch.Tensor, sigma: float, eta: float, z: torch.Tensor) -> torch.Tensor:
    """RES4LYF's "hard" noise swap for a flow model: the point at `sigma` on the line from
    `denoised` along `eps`, with an eta share of its noise replaced by fresh noise `z`."""
    noise_up = (MAX_NOISE_SHARE if eta >= 1 else eta) * sigma
    kept = (sigma**2 - noise_up**2) ** 0.5
    return ((1 - sigma) + kept) * denoised + kept * eps + noise_up * z


def _denoised(x: torch.Tensor, sigma: float) -> RowSampler:
    """One model call of a danrisi row: the denoised estimate at (x, sigma)."""
    v = yield x, torch.tensor(sigma, dtype=x.dtype)
    return x - sigma * v


def danrisi(x: torch.Tensor, sigmas: torch.Tensor, seed: int, eta: float = DANRISI_ETA,
            after_step: StepHook | None = None) -> RowSampler:
    """RES4LYF 46de917's linear/ralston_2s with SDE noise and bongmath, on `danrisi_sigmas`, for
    one image whose seed is `seed`.

    `x` is its latent at sigmas[0]: sigmas[0] times its unit start noise from text, or an
    image-to-image row's noised init latent on the schedule's tail. Each step makes two
    model calls: at the step's start and at its 2/3 point, each epsilon measured from the step's
    start (RES4LYF's noise anchor). With eta > 0 the 2/3 point and the step's end are re-noised
    ("hard" mode, eta_substep = eta), and while sigma > 0.03 the step's start is re-solved so the
    re-noised 2/3 point is an exact stage from it (bongmath). The last model call, at sigmas[-2]
    (sigma_min), returns its denoised estimate: 2N + 1 calls for N steps (`danrisi_calls`); a tail
    entered below sigma_min is that one call. `after_step` sees x at each step's end and the final
    estimate (at sigma 0). The noise generators live in this generator's frame, so a re-run
    replays the same noise and a row gives the same image in any company and after any pause.
    """
    levels = [float(sigma) for sigma in sigmas]
    if len(levels) < 2 or levels[-1] != 0.0:
        raise ValueError("a danrisi schedule ends with its last model call's sigma, then 0")
    sde = _SdeNoise(seed, x) if eta > 0 else None
    for sigma, sigma_next in pairwise(levels[:-1]):
        h = sigma_next - sigma
        sigma_mid = sigma + RALSTON_C2 * h
        d_start = yield from _denoised(x, sigma)
        eps_start = (x - d_start) / sigma
        x_mid = x + RALSTON_C2 * h * eps_start
        if sde is not None:
            x_mid = _renoise(d_start, eps_start, sigma_mid, eta, sde.substep())
            if sigma > BONGMATH_ABOVE_SIGMA:  # bongmath: the start that x_mid is an exact stage from
                x = (sigma * x_mid + (sigma_mid - sigma) * d_start) / sigma_mid
                eps_start = (x - d_start) / sigma
        eps_mid = (x - (yield from _denoised(x_mid, sigma_mid))) / sigma
        eps = RALSTON_WEIGHTS[0] * eps_start + RALSTON_WEIGHTS[1] * eps_mid
        if sde is None:
            x = x + h * eps
        else:
            x = _renoise(x - sigma * eps, eps, sigma_next, eta, sde.step())
        if after_step is not None:
            x = after_step(x, sigma_next)
    final = yield from _denoised(x, levels[-2])
    return final if after_step is None else after_step(final, 0.0)


def danrisi_calls(sigmas: torch.Tensor) -> int:
    """Two model calls per step and one at the last sigma before 0 (sigma_min)."""
    return 2 * (len(sigmas) - 2) + 1


def sample_danrisi(
    noise: torch.Tensor, sigmas: torch.Tensor, velocity: Velocity, should_stop: StopCheck, *,
    seeds: Sequence[int], eta: float = DANRISI_ETA,
) -> torch.Tensor:
    """`danrisi` for each image of the batch `noise` (unit start noise; seeds[i] being image i's
    seed) from sigmas[0] * noise, in lock-step."""
    if len(seeds) != noise.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {noise.shape[0]} images")
    x = float(sigmas[0]) * noise
    rows = [Row(danrisi(x[i : i + 1], sigmas, seed, eta), danrisi_calls(sigmas)) for i, seed in enumerate(seeds)]
    return _lockstep(rows, velocity, should_stop)
