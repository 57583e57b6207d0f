"""The job input contract (docs/API.md): validated before anything reaches a model."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.errors import JobError

MAX_PROMPT_CHARS = 2000
MAX_IMAGES = 16
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_STEPS = 50
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1
SIZE_MULTIPLE = 16
ASPECT_RATIOS = {"1:1": (1, 1), "16:9": (16, 9), "9:16": (9, 16), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2), "2:3": (2, 3)}
MEGAPIXEL = 1024 * 1024  # 1 "megapixel" is 1024x1024, so the default size is the model's native one
DEFAULT_QUALITY = {"png": None, "webp": 90, "jpeg": 90}
MAX_ID_WEIGHT = 3.0
MAX_REFERENCE_CHARS = 14 * 2**20  # a 10 MB image as base64, plus a data-URI header
# (steps, guidance_scale) when a request leaves them out, for the mode that runs: Z-Image-Turbo is
# distilled for 8 steps without CFG; FLUX.1-dev with PuLID wants ~20 steps and its distilled
# guidance ~4 (PuLID's "fake CFG", one forward per step)
MODE_DEFAULTS = {"fast": (8, 0.0), "consistent": (20, 4.0)}

Workflow = Literal["auto", "z-image-simple", "z-image-danrisi"]
Mode = Literal["fast", "consistent"]
ImageFormat = Literal["png", "webp", "jpeg"]


class CapabilitiesRequest(BaseModel):
    """`{"action": "capabilities"}`: what this endpoint can serve."""

    model_config = ConfigDict(extra="forbid", strict=True)
    action: Literal["capabilities"]


class GenerateRequest(BaseModel):
    """A request for `num_images` images of one prompt at one size and sampler setting."""

    model_config = ConfigDict(extra="forbid", strict=True)

    action: Literal["generate"] = "generate"
    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    width: int | None = None
    height: int | None = None
    aspect_ratio: str | None = None
    megapixels: float | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    workflow: Workflow = "auto"
    eta: float | None = Field(default=None, ge=0, le=1)  # danrisi's SDE noise share (default 0.5)
    mode: Mode = "fast"
    output_format: ImageFormat = "webp"
    output_quality: int | None = None
    delivery: Literal["base64", "url"] = "base64"
    reference_image: str | None = None
    id_weight: float = 1.0
    identity_start_step: int | None = None
    fallback: Literal["none", "fast"] = "none"

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"must be at most {MAX_PROMPT_CHARS} characters")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt(cls, value: str) -> str:
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"must be at most {MAX_PROMPT_CHARS} characters")
        return value

    @field_validator("num_images")
    @classmethod
    def _num_images(cls, value: int) -> int:
        return _between(value, 1, MAX_IMAGES)

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int | None) -> int | None:
        if value is None:
            return None
        _between(value, MIN_SIDE, MAX_SIDE)
        if value % SIZE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIZE_MULTIPLE}")
        return value

    @field_validator("aspect_ratio")
    @classmethod
    def _aspect_ratio(cls, value: str | None) -> str | None:
        if value is not None and value not in ASPECT_RATIOS:
            raise ValueError(f"must be one of {', '.join(ASPECT_RATIOS)}")
        return value

    @field_validator("megapixels")
    @classmethod
    def _megapixels(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and 0.01 <= value <= 4.0):
            raise ValueError("must be between 0.01 and 4.0")
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: int | None) -> int | None:
        return None if value is None else _between(value, 1, MAX_STEPS)

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, value: float | None) -> float | None:
        return None if value is None else _finite_up_to(value, MAX_GUIDANCE)

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        return None if value is None else _between(value, 0, MAX_SEED)

    @field_validator("output_quality")
    @classmethod
    def _quality(cls, value: int | None) -> int | None:
        return None if value is None else _between(value, 1, 100)

    @field_validator("reference_image")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and not (0 < len(value) <= MAX_REFERENCE_CHARS):
            raise ValueError("must be a non-empty https URL or base64 image of at most 10 MB")
        return value

    @field_validator("id_weight")
    @classmethod
    def _id_weight(cls, value: float) -> float:
        return _finite_up_to(value, MAX_ID_WEIGHT)

    @field_validator("identity_start_step")
    @classmethod
    def _start_step(cls, value: int | None) -> int | None:
        return None if value is None else _between(value, 0, MAX_STEPS - 1)

    @model_validator(mode="after")
    def _consistent(self) -> "GenerateRequest":
        if self.mode == "consistent" and self.reference_image is None:
            raise _FieldRule("reference_image", "is required in consistent mode")
        if self.mode == "fast" and self.reference_image is not None:
            raise _FieldRule("reference_image", "is only used in consistent mode")
        if self.identity_start_step is not None and self.identity_start_step >= self.sampling("consistent")[0]:
            raise _FieldRule("identity_start_step", "must be less than steps")
        return self

    @model_validator(mode="after")
    def _eta_needs_danrisi(self) -> "GenerateRequest":
        if self.eta is not None and self.workflow == "z-image-simple":
            raise _FieldRule("eta", "is only used by z-image-danrisi")
        return self

    def sampling(self, mode: Mode) -> tuple[int, float]:
        """(steps, guidance_scale) for the mode that runs: the request's, else that mode's defaults."""
        steps, guidance = MODE_DEFAULTS[mode]
        return (steps if self.steps is None else self.steps,
                guidance if self.guidance_scale is None else self.guidance_scale)

    @model_validator(mode="after")
    def _size(self) -> "GenerateRequest":
        explicit = self.width is not None or self.height is not None
        by_ratio = self.aspect_ratio is not None or self.megapixels is not None
        if explicit and by_ratio:
            raise _FieldRule("aspect_ratio", "give either width/height or aspect_ratio/megapixels, not both")
        if by_ratio:
            self.width, self.height = size_for_aspect_ratio(self.aspect_ratio or "1:1", self.megapixels or 1.0)
        else:
            self.width = self.width or 1024
            self.height = self.height or 1024
        return self


class _FieldRule(ValueError):
    """A cross-field rule that names the field it blames."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(rule)
        self.field = field
        self.rule = rule


def _between(value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}")
    return value


def _finite_up_to(value: float, high: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= high):
        raise ValueError(f"must be a finite number between 0 and {high:g}")
    return value


def size_for_aspect_ratio(aspect_ratio: str, megapixels: float) -> tuple[int, int]:
    """Width and height near `megapixels` at the ratio, each a multiple of 16 within bounds."""
    rw, rh = ASPECT_RATIOS[aspect_ratio]
    height = math.sqrt(megapixels * MEGAPIXEL * rh / rw)
    width = height * rw / rh

    def snap(side: float) -> int:
        return min(MAX_SIDE, max(MIN_SIDE, SIZE_MULTIPLE * round(side / SIZE_MULTIPLE)))

    return snap(width), snap(height)


def parse_job_input(raw: Any) -> GenerateRequest | CapabilitiesRequest:
    """Validate a job's `input`; raise JobError(invalid_input) naming the first bad field."""
    if not isinstance(raw, dict):
        raise JobError("invalid_input", "must be a JSON object", field="input")
    try:
        if raw.get("action") == "capabilities":
            return CapabilitiesRequest.model_validate(raw)
        return GenerateRequest.model_validate(raw)
    except ValidationError as err:
        raise _as_job_error(err) from None


_SAFE_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # a plain identifier


def _as_job_error(err: ValidationError) -> JobError:
    first = err.errors(include_url=False)[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, _FieldRule):
        return JobError("invalid_input", cause.rule, field=cause.field)
    field = ".".join(str(part) for part in first["loc"]) or "input"
    if first["type"] == "extra_forbidden":
        if not _SAFE_FIELD.match(field):  # a client's key is echoed only when it cannot garble the message
            return JobError("invalid_input", f"unknown field {ascii(field[:40])}", field="input")
        return JobError("invalid_input", "unknown field", field=field)
    if first["type"] == "missing":
        return JobError("invalid_input", "is required", field=field)
    rule = first["msg"].removeprefix("Value error, ")
    return JobError("invalid_input", rule[:1].lower() + rule[1:], field=field)
