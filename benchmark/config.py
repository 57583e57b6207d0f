"""The benchmark config (JSON) and its expansion into permutations (see docs/BENCHMARK.md)."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MATRIX = "matrix"
WIZARD_BASE = "wizard_base"
WIZARD_PROFILE = "wizard_profile"
WIZARD_PROFILE_FROM_BASE = "wizard_profile_from_base"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Matrix(_Strict):
    """Every combination of these lists is one permutation (per vertical)."""

    workflows: list[str] = Field(default=["auto"], min_length=1)
    modes: list[str] = Field(default=["fast"], min_length=1)
    steps: list[int] = Field(default=[8], min_length=1)
    resolutions: list[tuple[int, int]] = Field(default=[(1024, 1024)], min_length=1)
    num_images: list[int] = Field(default=[1], min_length=1)
    concurrency: list[int] = Field(default=[1], min_length=1)
    # LoRA sets, each a permutation: a list of the API's `loras` entries ({"path", "scale"}) that
    # every job of the run sends; a set of sets (a list of lists) gives job j the set j mod n, so
    # concurrent jobs bring different LoRAs (the users' case: one character LoRA per user)
    loras: list[list[dict[str, Any]] | list[list[dict[str, Any]]]] = Field(default=[[]], min_length=1)


class Wizard(_Strict):
    """The users' flow: `base_jobs` one-image jobs at once, then one job of `profile_images`.
    With `profile_from_base`, also the profile set made from the chosen base image: the base jobs,
    then `profile_images` variations of the first one's image (its `init_image`) at `strength`."""

    workflow: str = "auto"
    mode: str = "fast"
    steps: int = 8
    width: int = 1024
    height: int = 1024
    base_jobs: int = Field(default=3, ge=1, le=16)
    profile_images: int = Field(default=8, ge=1, le=16)
    profile_from_base: bool = False
    strength: float = Field(default=0.6, gt=0, le=1)


class Limits(_Strict):
    request_timeout_s: float = Field(default=30.0, gt=0, le=600)
    job_timeout_s: float = Field(default=300.0, gt=0, le=3600)
    poll_interval_s: float = Field(default=0.5, ge=0.05, le=10)
    max_retries: int = Field(default=4, ge=0, le=10)
    max_runs: int = Field(default=500, ge=1, le=10_000)


class BenchmarkConfig(_Strict):
    name: str
    verticals: dict[str, list[str]] = Field(min_length=1)
    defaults: dict[str, Any] = Field(default_factory=dict)  # extra input fields for every job
    matrix: Matrix | None = None
    wizard: Wizard | None = None
    repetitions: int = Field(default=3, ge=1, le=100)
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _check(self) -> BenchmarkConfig:
        if self.matrix is None and self.wizard is None:
            raise ValueError("config needs a matrix, a wizard, or both")
        if any(not prompts for prompts in self.verticals.values()):
            raise ValueError("every vertical needs at least one prompt")
        runs = len(permutations(self)) * self.repetitions
        if runs > self.limits.max_runs:
            raise ValueError(f"{runs} runs exceed limits.max_runs={self.limits.max_runs}")
        return self


@dataclass(frozen=True)
class Permutation:
    """One measured setting; a run submits `jobs` jobs of `num_images` images at once."""

    scenario: str
    vertical: str
    workflow: str
    mode: str
    steps: int
    width: int
    height: int
    num_images: int
    jobs: int
    loras: str = "[]"  # the matrix's LoRA set as JSON (hashable; see Matrix.loras)
    strength: float | None = None  # image to image (the profile set from the base image)

    @property
    def key(self) -> str:
        lora = f"/lora{_lora_label(json.loads(self.loras))}" if json.loads(self.loras) else ""
        strength = f"/strength{self.strength:g}" if self.strength is not None else ""
        return (f"{self.scenario}/{self.vertical}/{self.workflow}/{self.mode}/s{self.steps}/"
                f"{self.width}x{self.height}/{self.jobs}x{self.num_images}img{lora}{strength}")

    def settings(self) -> dict[str, Any]:
        return asdict(self)

    def job_loras(self, job: int) -> list[dict[str, Any]]:
        """Job `job`'s `loras`: the set, or set `job mod n` of a set of sets."""
        loras = json.loads(self.loras)
        if loras and isinstance(loras[0], list):
            return loras[job % len(loras)]
        return loras


def _lora_label(loras: list) -> str:
    """`1` for one LoRA on every job, `4mixed` for four sets that concurrent jobs cycle through."""
    return f"{len(loras)}mixed" if isinstance(loras[0], list) else str(len(loras))


def permutations(config: BenchmarkConfig) -> list[Permutation]:
    """Matrix permutations, then the wizard's two steps, for each vertical."""
    out: list[Permutation] = []
    for vertical in config.verticals:
        if config.matrix is not None:
            m = config.matrix
            for workflow, mode, steps, (width, height), num, jobs, loras in itertools.product(
                m.workflows, m.modes, m.steps, m.resolutions, m.num_images, m.concurrency, m.loras
            ):
                out.append(Permutation(MATRIX, vertical, workflow, mode, steps, width, height, num, jobs,
                                       json.dumps(loras)))
        if config.wizard is not None:
            w = config.wizard
            common = (vertical, w.workflow, w.mode, w.steps, w.width, w.height)
            out.append(Permutation(WIZARD_BASE, *common, num_images=1, jobs=w.base_jobs))
            out.append(Permutation(WIZARD_PROFILE, *common, num_images=w.profile_images, jobs=1))
            if w.profile_from_base:
                out.append(Permutation(WIZARD_PROFILE_FROM_BASE, *common, num_images=w.profile_images, jobs=1,
                                       strength=w.strength))
    return out


def base_step(config: BenchmarkConfig, perm: Permutation) -> Permutation:
    """The base jobs a profile-from-base run makes first (the wizard's base step)."""
    if config.wizard is None:
        raise ValueError("a profile set from the base image needs the config's wizard")
    return replace(perm, scenario=WIZARD_BASE, num_images=1, jobs=config.wizard.base_jobs, strength=None)


def job_inputs(config: BenchmarkConfig, perm: Permutation, repetition: int,
               init_image: str | None = None) -> list[dict[str, Any]]:
    """The inputs of one run: prompts cycle through the vertical, seeds differ per job. A profile
    set from the base image is one job: the first base job's prompt, the seed after the base
    jobs', `init_image` (that job's image: base64 or URL) and `strength`."""
    prompts = config.verticals[perm.vertical]
    if perm.scenario == WIZARD_PROFILE_FROM_BASE:
        if init_image is None:
            raise ValueError("a profile set from the base image needs the base image")
        base = job_inputs(config, base_step(config, perm), repetition)
        return [{**base[0], "num_images": perm.num_images, "seed": base[-1]["seed"] + 1,
                 "init_image": init_image, "strength": perm.strength}]
    inputs = []
    for j in range(perm.jobs):
        inputs.append({
            **config.defaults,
            "action": "generate",
            "prompt": prompts[(repetition * perm.jobs + j) % len(prompts)],
            "num_images": perm.num_images,
            "width": perm.width,
            "height": perm.height,
            "steps": perm.steps,
            "workflow": perm.workflow,
            "mode": perm.mode,
            "seed": 1000 * repetition + j,
        } | ({"loras": perm.job_loras(j)} if perm.job_loras(j) else {}))
    return inputs


def load_config(path: Path) -> BenchmarkConfig:
    return BenchmarkConfig.model_validate(json.loads(path.read_text()))
