"""Sigma schedules and the two samplers.

The danrisi sampler is checked against an independent transcription of the users' ComfyUI graph,
written here in RES4LYF 46de917's own terms (the stage arrays x_, eps_, data_, the noise anchor,
the "hard" noise swap and bongmath's fixed-point re-solve) and run on a toy flow model whose
denoiser is exact, so any difference is the sampler's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_distribution

from pipelines.engine import Row, SamplingStopped, call_model
from pipelines.samplers import (
    danrisi, danrisi_calls, danrisi_sigmas, danrisi_start_noise, euler, euler_calls, sample_danrisi, sample_euler,
    simple_sigmas,
)

SHIFT = 3.0


def test_simple_schedule_is_diffusers_z_image_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / 8, 8).tolist())
    torch.testing.assert_close(simple_sigmas(8, 3.0), scheduler.sigmas)
    assert len(simple_sigmas(8, 3.0)) == 9  # 8 model calls


def _straight_flow(x0: torch.Tensor, noise: torch.Tensor):
    """The exact velocity field of x_sigma = (1 - sigma) x0 + sigma noise: v = noise - x0 everywhere."""
    return lambda x, sigma: noise - x0


def test_euler_recovers_the_data_point_of_a_straight_flow():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    result = sample_euler(noise, simple_sigmas(4, 3.0), _straight_flow(x0, noise), lambda: False)
    assert torch.allclose(result, x0, atol=1e-5)


def test_euler_stops_between_model_calls():
    calls = []

    def velocity(x, sigma):
        calls.append(sigma)
        return torch.zeros_like(x)

    with pytest.raises(SamplingStopped):
        sample_euler(torch.zeros(1, 1, 2, 2), simple_sigmas(8, 3.0), velocity, lambda: len(calls) >= 2)
    assert len(calls) == 2


# -- the danrisi schedule, by hand ----------------------------------------------------------------
def comfy_danrisi_schedule(steps: int) -> np.ndarray:
    """ComfyUI's beta_scheduler (0.4, 0.4) on Z-Image's table, Sigmas Rescale 0.996..0, then
    RES4LYF's prepare_sigmas, step by step in float64 (their float32 rounding is within 1e-6)."""
    table = [SHIFT * (i / 1000) / (1 + (SHIFT - 1) * (i / 1000)) for i in range(1, 1001)]
    picked, last = [], -1
    for n in range(steps):
        t = round(float(beta_distribution.ppf(1 - n / steps, 0.4, 0.4)) * 999)
        if t != last:
            picked.append(table[t])
        last = t
    picked.append(0.0)
    rescaled = [(s - min(picked)) * 0.996 / (max(picked) - min(picked)) for s in picked]
    sigma_min = table[0]
    if rescaled[-2] < sigma_min:
        rescaled[-2] = sigma_min
    elif abs(rescaled[-2] - sigma_min) > 1e-4:
        rescaled.insert(-1, sigma_min)
    return np.array(rescaled)


def test_danrisi_schedule_is_comfyui_beta_rescaled_with_res4lyf_sigma_min():
    sigmas = danrisi_sigmas(20, SHIFT)
    expected = comfy_danrisi_schedule(20)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 22  # 20 steps, then sigma_min, then 0
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=0, atol=1e-6)
    assert sigmas[0].item() == pytest.approx(0.996, abs=1e-7)
    assert sigmas[-2].item() == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), abs=1e-8)  # shift(1/1000)
    assert sigmas[-1].item() == 0.0 and bool((sigmas[:-1] > sigmas[1:]).all())


def test_danrisi_schedule_raises_a_too_low_end_to_sigma_min():
    """From 36 steps the table's first entries repeat: ComfyUI drops the repeat and RES4LYF lifts
    the last sigma (0.996 of the table's first) to sigma_min instead of inserting it."""
    sigmas = danrisi_sigmas(40, SHIFT)
    np.testing.assert_allclose(sigmas.numpy(), comfy_danrisi_schedule(40), rtol=0, atol=1e-6)
    assert len(sigmas) == 40


# -- a toy flow model with an exact denoiser ---------------------------------------------------------
class GaussianMixtureFlow:
    """x_sigma = (1 - sigma) x0 + sigma n, with x0 drawn from an equal-weight mixture of isotropic
    Gaussians over whole latents. D(x, sigma) = E[x0 | x_sigma] in closed form, image by image."""

    def __init__(self, shape: tuple[int, ...], components: int = 3, spread: float = 0.3, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.means = torch.randn((components, *shape), generator=generator, dtype=torch.float64)
        self.spread = spread
        self.calls: list[float] = []

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        alpha, tau2 = 1 - sigma, self.spread**2
        variance = alpha**2 * tau2 + sigma**2
        offsets = x.unsqueeze(1) - alpha * self.means.unsqueeze(0)  # (images, components, ...)
        log_weights = -(offsets**2).flatten(2).sum(-1) / (2 * variance)
        weights = torch.softmax(log_weights, dim=1).view(*log_weights.shape, *[1] * (x.ndim - 1))
        posterior = self.means.unsqueeze(0) + (alpha * tau2 / variance) * offsets
        return (weights * posterior).sum(1)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """One sigma per row: rows of one call may be at different levels."""
        rows = []
        for row, value in zip(x.split(1), sigma.tolist()):
            self.calls.append(value)
            rows.append((row - self.denoise(row, value)) / value)
        return torch.cat(rows)


# -- RES4LYF 46de917, transcribed in its own terms ------------------------------------------------
def res4lyf_gaussian(seed: int, shape: tuple[int, ...]):
    """GaussianNoiseGenerator (float64, z-scored) followed by normalize_zscore(channelwise=True)."""
    generator = torch.Generator().manual_seed(seed)

    def draw() -> torch.Tensor:
        noise = torch.randn(shape, dtype=torch.float64, generator=generator)
        noise = (noise - noise.mean()) / noise.std()
        return noise.sub_(noise.mean(dim=(-2, -1), keepdim=True)).div_(noise.std(dim=(-2, -1), keepdim=True))

    return draw


def res4lyf_hard_sde(sigma_next: float, eta: float, sigma_max: float = 1.0) -> tuple[float, float, float]:
    """get_sde_step, noise mode "hard", for a CONST (flow) model: (sigma_up, sigma_down, alpha_ratio)."""
    sigma_up = sigma_next * eta
    if sigma_up >= sigma_next:
        sigma_up = sigma_next * 0.9999 if eta >= 1 else sigma_next * eta
    sigma_residual = (sigma_next**2 - sigma_up**2) ** 0.5
    alpha_ratio = (sigma_max - sigma_next) + sigma_residual
    return sigma_up, sigma_residual / alpha_ratio, alpha_ratio


def res4lyf_ralston_2s(model: GaussianMixtureFlow, noise: torch.Tensor, sigmas: np.ndarray, eta: float,
                       seed: int) -> torch.Tensor:
    """ClownsharKSampler_Beta: linear/ralston_2s, noise_anchor 1, eta_substep = eta, bongmath."""
    A = [[0.0, 0.0], [2 / 3, 0.0]]
    B = [1 / 4, 3 / 4]
    C = [0.0, 2 / 3, 1.0]
    step_noise = res4lyf_gaussian(seed + 1, tuple(noise.shape))
    substep_noise = res4lyf_gaussian(seed + 1 + 10000, tuple(noise.shape))
    sigma_min = float(sigmas[-2])

    def RK(x_row, sub_sigma, x_0, sigma):  # RK_Method_Linear.__call__ with LINEAR_ANCHOR_X_0 = 1
        denoised = model.denoise(x_row, sub_sigma)
        return (x_0 - denoised) / sigma, denoised

    x = sigmas[0] * noise
    for step in range(len(sigmas) - 2):
        sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        h = sigma_next - sigma
        s_ = [sigma + h * c for c in C]
        x_, eps_, data_ = [torch.zeros_like(x) for _ in range(3)], [torch.zeros_like(x)] * 2, [None, None]
        x_[0] = x.clone()
        x_0 = x_[0].clone()
        for row in range(2):
            eps_[row], data_[row] = RK(x_[row], s_[row], x_0, sigma)
            # update_substep: row 0 fills stage 1 from the A row, row 1 the step's end from B
            if row == 0:
                x_[1] = x_0 + h * sum(A[1][j] * eps_[j] for j in range(2))
                sub_up, sub_down, sub_alpha = res4lyf_hard_sde(s_[1], eta)
                if sub_up > 0:  # swap_noise_substep
                    eps_next = (x_0 - x_[1]) / (sigma - s_[1])
                    denoised_next = x_0 - sigma * eps_next
                    x_[1] = sub_alpha * (denoised_next + sub_down * eps_next) + sub_up * substep_noise()
                if sigma > 0.03:  # bong_iter
                    for _ in range(100):
                        x_0 = x_[1] - h * sum(A[1][j] * eps_[j] for j in range(2))
                        x_[0] = x_0 + h * sum(A[0][j] * eps_[j] for j in range(2))
                        eps_[0] = (x_0 - data_[0]) / sigma
            else:
                x_[2] = x_0 + h * sum(B[j] * eps_[j] for j in range(2))
        x_next = x_[2]
        sigma_up, sigma_down, alpha_ratio = res4lyf_hard_sde(sigma_next, eta)
        if eta == 0.0 or sigma_up == 0:
            x = x_next
        else:  # swap_noise_step
            eps_next = (x_0 - x_next) / (sigma - sigma_next)
            denoised_next = x_0 - sigma * eps_next
            x = alpha_ratio * (denoised_next + sigma_down * eps_next) + sigma_up * step_noise()
    _, denoised = RK(x, sigma_min, x, sigma_min)
    return denoised


SHAPE = (1, 4, 8, 8)


def _start_noise(seed: int, images: int = 1) -> torch.Tensor:
    return torch.randn((images, *SHAPE[1:]), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_danrisi_reproduces_res4lyf_ralston_2s_on_an_exact_denoiser(eta):
    model = GaussianMixtureFlow(SHAPE[1:])
    noise, seed = _start_noise(11), 1234
    expected = res4lyf_ralston_2s(model, noise, comfy_danrisi_schedule(20), eta, seed)
    result = sample_danrisi(noise, danrisi_sigmas(20, SHIFT), model.velocity, lambda: False, seeds=[seed], eta=eta)
    assert result.dtype == torch.float64
    assert torch.allclose(result, expected, rtol=0, atol=1e-5), (result - expected).abs().max()


def test_danrisi_start_noise_is_res4lyfs_initial_noise_per_image():
    """SharkSampler's init noise: image i of the graph's batch draws with seed + i, like the SDE
    noise, and is re-centred once more (noise_mean 0)."""
    noise = danrisi_start_noise([5, 6], (2, 4, 8, 8))
    for row, seed in enumerate((5, 6)):
        expected = res4lyf_gaussian(seed, (1, 4, 8, 8))()
        expected = expected - expected.mean()
        assert torch.allclose(noise[row:row + 1], expected, rtol=0, atol=1e-12)
    assert noise.dtype == torch.float64 and not torch.allclose(noise[0], noise[1])


def test_danrisi_noise_matters_and_follows_the_seed():
    """The reproduction test can fail: eta and the seed both change the sample."""
    model = GaussianMixtureFlow(SHAPE[1:])
    noise, sigmas = _start_noise(11), danrisi_sigmas(8, SHIFT)
    ode = sample_danrisi(noise, sigmas, model.velocity, lambda: False, seeds=[1], eta=0.0)
    sde = sample_danrisi(noise, sigmas, model.velocity, lambda: False, seeds=[1], eta=0.5)
    other_seed = sample_danrisi(noise, sigmas, model.velocity, lambda: False, seeds=[2], eta=0.5)
    assert (ode - sde).abs().max() > 1e-2 and (sde - other_seed).abs().max() > 1e-2


def test_danrisi_makes_two_model_calls_per_step_and_a_last_one_at_sigma_min():
    model = GaussianMixtureFlow(SHAPE[1:])
    sigmas = danrisi_sigmas(8, SHIFT)
    sample_danrisi(_start_noise(0), sigmas, model.velocity, lambda: False, seeds=[0])
    assert len(model.calls) == 2 * 8 + 1
    assert model.calls[0] == pytest.approx(float(sigmas[0]))
    assert model.calls[1] == pytest.approx(float(sigmas[0] + 2 / 3 * (sigmas[1] - sigmas[0])))
    assert model.calls[-1] == pytest.approx(float(sigmas[-2]))


def test_danrisi_batch_equals_each_image_alone_and_a_rerun_replays_the_noise():
    model = GaussianMixtureFlow(SHAPE[1:])
    sigmas, seeds = danrisi_sigmas(8, SHIFT), [5, 9]
    noise = _start_noise(3, images=2)
    batch = sample_danrisi(noise, sigmas, model.velocity, lambda: False, seeds=seeds)
    again = sample_danrisi(noise, sigmas, model.velocity, lambda: False, seeds=seeds)
    alone = [sample_danrisi(noise[i:i + 1], sigmas, model.velocity, lambda: False, seeds=[seeds[i]]) for i in range(2)]
    assert torch.allclose(batch, again, rtol=0, atol=1e-12)
    assert torch.allclose(batch, torch.cat(alone), rtol=0, atol=1e-12)


def test_rows_paused_joined_and_mixed_with_the_other_sampler_equal_each_alone():
    """The scheduler's freedom at the sampler level: rows stepped in any company (alone, together,
    at different levels, beside an Euler row), paused for a while, give what each gives alone."""
    model = GaussianMixtureFlow(SHAPE[1:])
    sigmas, noise = danrisi_sigmas(4, SHIFT), _start_noise(3, images=3)
    start = float(sigmas[0]) * noise  # a danrisi row starts from its latent at sigmas[0]
    rows = [Row(danrisi(start[0:1], sigmas, 5), danrisi_calls(sigmas)),
            Row(danrisi(start[1:2], sigmas, 9, eta=0.0), danrisi_calls(sigmas)),
            Row(euler(noise[2:3], simple_sigmas(6, SHIFT)), euler_calls(simple_sigmas(6, SHIFT)))]
    schedule = [[0], [0], [0, 1], [2], [0, 1, 2], [1], [1, 2], [0, 2]]  # then everything left, together
    for chosen in schedule:
        call_model([rows[i] for i in chosen], model.velocity)
    assert [row.calls_left for row in rows] == [9 - 5, 9 - 4, 6 - 4]
    while not all(row.done for row in rows):
        call_model([row for row in rows if not row.done], model.velocity)
    assert [row.calls_left for row in rows] == [0, 0, 0]
    alone = [sample_danrisi(noise[0:1], sigmas, model.velocity, lambda: False, seeds=[5]),
             sample_danrisi(noise[1:2], sigmas, model.velocity, lambda: False, seeds=[9], eta=0.0),
             sample_euler(noise[2:3], simple_sigmas(6, SHIFT), model.velocity, lambda: False)]
    for row, expected in zip(rows, alone):
        assert torch.allclose(row.latents, expected, rtol=0, atol=1e-12)


def test_a_failing_row_update_is_that_rows_error_and_the_others_advance():
    def broken(x: torch.Tensor, sigmas: torch.Tensor):
        yield x, sigmas[0]
        raise ArithmeticError("bad latent")

    good = Row(euler(torch.zeros(1, 1, 2, 2), simple_sigmas(2, SHIFT)), 2)
    bad = Row(broken(torch.zeros(1, 1, 2, 2), simple_sigmas(2, SHIFT)), 2)
    call_model([bad, good], lambda x, sigma: torch.ones_like(x))
    assert isinstance(bad.error, ArithmeticError) and bad.done
    assert good.error is None and not good.done and good.calls_left == 1


def test_danrisi_works_in_the_latents_dtype():
    """Float32 latents: the SDE noise is drawn in float64 and cast, the result stays float32 and
    close to the float64 run."""
    model = GaussianMixtureFlow(SHAPE[1:])
    sigmas, noise = danrisi_sigmas(8, SHIFT), _start_noise(4)

    def velocity32(x, sigma):
        return model.velocity(x.double(), sigma).float()

    result = sample_danrisi(noise.float(), sigmas, velocity32, lambda: False, seeds=[4])
    reference = sample_danrisi(noise, sigmas, model.velocity, lambda: False, seeds=[4])
    assert result.dtype == torch.float32
    assert torch.allclose(result.double(), reference, atol=1e-4)


def test_danrisi_stops_before_a_model_call():
    model = GaussianMixtureFlow(SHAPE[1:])
    with pytest.raises(SamplingStopped):
        sample_danrisi(_start_noise(0), danrisi_sigmas(8, SHIFT), model.velocity, lambda: len(model.calls) >= 3,
                       seeds=[0])
    assert len(model.calls) == 3


def test_danrisi_wants_one_seed_per_image():
    with pytest.raises(ValueError, match="2 seeds for 1 images"):
        sample_danrisi(_start_noise(0), danrisi_sigmas(2, SHIFT), lambda x, s: x, lambda: False, seeds=[1, 2])


def test_danrisi_lands_near_a_mode_of_the_toy_data():
    """A sanity check on the toy: 20 steps end within a few spreads of one of the mixture's means."""
    model = GaussianMixtureFlow(SHAPE[1:])
    result = sample_danrisi(_start_noise(7), danrisi_sigmas(20, SHIFT), model.velocity, lambda: False, seeds=[7])
    distances = ((result - model.means) ** 2).flatten(1).sum(-1).sqrt()
    assert distances.min() < 3 * model.spread * math.sqrt(result.numel())
