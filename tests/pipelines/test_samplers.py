"""Sigma schedules and the two samplers, checked against closed-form answers."""

from __future__ import annotations

import pytest
import torch

from pipelines.samplers import SamplingStopped, beta_sigmas, sample_euler, sample_res_2s, simple_sigmas


def test_simple_schedule_is_diffusers_z_image_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / 8, 8).tolist())
    torch.testing.assert_close(simple_sigmas(8, 3.0), scheduler.sigmas)
    assert len(simple_sigmas(8, 3.0)) == 9  # 8 model calls


def test_beta_schedule_starts_at_0_996_falls_and_ends_at_zero():
    sigmas = beta_sigmas(8, 3.0)
    assert len(sigmas) == 9 and sigmas[0].item() == pytest.approx(0.996) and sigmas[-1].item() == 0.0
    assert bool((sigmas[:-1] > sigmas[1:]).all())


def _straight_flow(x0: torch.Tensor, noise: torch.Tensor):
    """The exact velocity field of x_sigma = (1 - sigma) x0 + sigma noise: v = noise - x0 everywhere."""
    return lambda x, sigma: noise - x0


@pytest.mark.parametrize("sampler", [sample_euler, sample_res_2s])
def test_samplers_recover_the_data_point_of_a_straight_flow(sampler):
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    result = sampler(noise, simple_sigmas(4, 3.0), _straight_flow(x0, noise), lambda: False)
    assert torch.allclose(result, x0, atol=1e-5)


def test_res_2s_is_exact_for_a_constant_denoiser_at_every_step():
    """With D(x, sigma) = c, the exponential integrator lands on the flow ODE's exact solution:
    x(sigma') = c + (sigma'/sigma) (x - c)."""
    c, x = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    result = sample_res_2s(x, torch.tensor([0.9, 0.5, 0.2]), lambda x_in, s: (x_in - c) / s, lambda: False)
    assert torch.allclose(result, c + (0.2 / 0.9) * (x - c), atol=1e-5)


def test_res_2s_calls_the_model_twice_per_step_and_once_on_the_last():
    calls = []

    def velocity(x, sigma):
        calls.append(sigma)
        return torch.zeros_like(x)

    sample_res_2s(torch.zeros(1, 1, 2, 2), beta_sigmas(8, 3.0), velocity, lambda: False)
    assert len(calls) == 7 * 2 + 1


@pytest.mark.parametrize("sampler", [sample_euler, sample_res_2s])
def test_samplers_stop_between_model_calls(sampler):
    calls = []

    def velocity(x, sigma):
        calls.append(sigma)
        return torch.zeros_like(x)

    with pytest.raises(SamplingStopped):
        sampler(torch.zeros(1, 1, 2, 2), simple_sigmas(8, 3.0), velocity, lambda: len(calls) >= 2)
    assert len(calls) == 2
