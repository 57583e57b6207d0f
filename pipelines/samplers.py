"""Sigma schedules and samplers for a flow-matching model.

A sampler sees the model only through `velocity(x, sigma) -> v`, the flow velocity dx/dsigma
(Z-Image's transformer output, negated). The denoised estimate is D = x - sigma * v.
Schedules are float32 tensors and the Euler step is done in float32, exactly as diffusers'
scheduler does it, so the simple workflow matches `ZImagePipeline` pixel for pixel.
`should_stop` is polled at every model-call boundary so a cancelled batch frees the GPU early.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from scipy.special import betaincinv

from pipelines.engine import SamplingStopped, StopCheck

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The static time shift of Z-Image's scheduler: s -> shift*s / (1 + (shift-1)*s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _with_terminal_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), torch.zeros(1)])


def simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """diffusers 0.42's Z-Image schedule: linspace(1, 1/n, n), shifted, then 0. n model calls."""
    return _with_terminal_zero(shift_sigmas(torch.linspace(1.0, 1.0 / steps, steps), shift))


def beta_sigmas(steps: int, shift: float, alpha: float = 0.4, beta: float = 0.4, sigma_max: float = 0.996) -> torch.Tensor:
    """The danrisi schedule: beta-distributed timesteps, shifted, rescaled to start at sigma_max, then 0."""
    quantiles = [1.0 - i / steps for i in range(steps)]
    shifted = shift_sigmas(torch.tensor([float(betaincinv(alpha, beta, q)) for q in quantiles], dtype=torch.float64), shift)
    return _with_terminal_zero(shifted * (sigma_max / shifted[0]))


def sample_euler(x: torch.Tensor, sigmas: torch.Tensor, velocity: Velocity, should_stop: StopCheck) -> torch.Tensor:
    """Flow-match Euler: one model call per step."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if should_stop():
            raise SamplingStopped
        x = x + (sigma_next - sigma) * velocity(x, sigma)
    return x


def _phi1(z: float) -> float:
    return math.expm1(z) / z


def _phi2(z: float) -> float:
    return (math.expm1(z) - z) / (z * z)


def sample_res_2s(
    x: torch.Tensor, sigmas: torch.Tensor, velocity: Velocity, should_stop: StopCheck, c2: float = 0.5
) -> torch.Tensor:
    """2-stage exponential Runge-Kutta (res_2s, arXiv 2308.02157), deterministic (eta 0).

    Two model calls per step; the last step, to sigma 0, takes the denoised estimate directly.
    """

    def denoised(x_in: torch.Tensor, sigma: float) -> torch.Tensor:
        if should_stop():
            raise SamplingStopped
        return x_in - sigma * velocity(x_in, torch.tensor(sigma, dtype=torch.float32))

    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d1 = denoised(x, sigma)
        if sigma_next == 0.0:
            x = d1
            continue
        h = math.log(sigma / sigma_next)
        sigma_mid = sigma * math.exp(-c2 * h)
        x_mid = math.exp(-c2 * h) * x + (-math.expm1(-c2 * h)) * d1
        d2 = denoised(x_mid, sigma_mid)
        b2 = _phi2(-h) / c2
        b1 = _phi1(-h) - b2
        x = x + h * (b1 * (d1 - x) + b2 * (d2 - x))
    return x
