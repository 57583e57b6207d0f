"""The job input contract (docs/API.md): validated before anything reaches a model."""

from __future__ import annotations

import math
import re
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator,
)

from serving.errors import JobError
from serving.scheduler import Priority

MAX_PROMPT_CHARS = 2000
MAX_IMAGES = 16
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_STEPS = 50
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1
SIZE_MULTIPLE = 16
AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"]
ASPECT_RATIOS = {name: tuple(int(n) for n in name.split(":")) for name in get_args(AspectRatio)}
MEGAPIXEL = 1024 * 1024  # 1 "megapixel" is 1024x1024, so the default size is the model's native one
DEFAULT_QUALITY = {"png": None, "webp": 90, "jpeg": 90}
MAX_ID_WEIGHT = 3.0
MAX_IMAGE_CHARS = 14 * 2**20  # a 10 MB image as base64, plus a data-URI header
DEFAULT_STRENGTH = 0.6  # image-to-image: diffusers' default for ZImageImg2ImgPipeline
MAX_LORAS = 4
MAX_LORA_SCALE = 4.0
MAX_LORA_PATH_CHARS = 2048
# (steps, guidance_scale) when a request leaves them out, for the mode that runs: Z-Image-Turbo is
# distilled for 8 steps without CFG; FLUX.1-dev with PuLID wants ~20 steps and its distilled
# guidance ~4 (PuLID's "fake CFG", one forward per step)
MODE_DEFAULTS = {"fast": (8, 0.0), "consistent": (20, 4.0)}
# C0/C1 control characters and DEL, except tab, newline and carriage return (text pasted from any
# editor). Lone surrogates are refused by pydantic's str check (the tokenizer cannot encode them).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

Workflow = Literal["auto", "z-image-simple", "z-image-danrisi"]
Mode = Literal["fast", "consistent"]
ImageFormat = Literal["png", "webp", "jpeg"]


class CapabilitiesRequest(BaseModel):
    """`{"action": "capabilities"}`: what this endpoint can serve."""

    model_config = ConfigDict(extra="forbid", strict=True)
    action: Literal["capabilities"]


class LoraRef(BaseModel):
    """One LoRA of a request: a file name in LORA_DIR or an https URL, and its strength."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: str = Field(min_length=1, max_length=MAX_LORA_PATH_CHARS)
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)


class GenerateRequest(BaseModel):
    """A request for `num_images` images of one prompt at one size and sampler setting.

    Bounds are declared on the fields: error messages (`_as_job_error`) and the capabilities'
    `limits` (`input_limits`) are read from them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    action: Literal["generate"] = "generate"
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    width: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    aspect_ratio: AspectRatio | None = None
    megapixels: float | None = Field(None, ge=0.01, le=4.0, allow_inf_nan=False)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    workflow: Workflow = "auto"
    eta: float | None = Field(default=None, ge=0, le=1)  # danrisi's SDE noise share (default 0.5)
    mode: Mode = "fast"
    output_format: ImageFormat = "webp"
    output_quality: int | None = Field(None, ge=1, le=100)
    delivery: Literal["base64", "url"] = "base64"
    reference_image: str | None = Field(None, min_length=1, max_length=MAX_IMAGE_CHARS)
    id_weight: float = Field(1.0, ge=0.0, le=MAX_ID_WEIGHT, allow_inf_nan=False)
    identity_start_step: int | None = Field(None, ge=0, le=MAX_STEPS - 1)
    fallback: Literal["none", "fast"] = "none"
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)
    init_image: str | None = Field(None, min_length=1, max_length=MAX_IMAGE_CHARS)
    mask_image: str | None = Field(None, min_length=1, max_length=MAX_IMAGE_CHARS)
    strength: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    priority: Priority | None = None  # the scheduler's ranking: head start or handicap (serving/scheduler.py)
    _size_note: str | None = PrivateAttr(None)

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text(cls, value: str, info: ValidationInfo) -> str:
        if info.field_name == "prompt" and not value.strip():
            raise ValueError("must not be empty")
        control = _CONTROL.search(value)
        if control:
            raise ValueError(f"must not contain control characters other than tab, newline and carriage return: "
                             f"U+{ord(control[0]):04X} at position {control.start()}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GenerateRequest:
        if self.mode == "consistent" and self.reference_image is None:
            raise _FieldRule("reference_image", "is required in consistent mode")
        if self.mode == "fast" and self.reference_image is not None:
            raise _FieldRule("reference_image", "is only used in consistent mode")
        if self.identity_start_step is not None and self.identity_start_step >= self.sampling("consistent")[0]:
            raise _FieldRule("identity_start_step", "must be less than steps")
        if self.mode == "consistent" and self.loras:
            raise _FieldRule("loras", "are only available in fast mode (Z-Image), not with PuLID-FLUX")
        return self

    @model_validator(mode="after")
    def _image_to_image(self) -> GenerateRequest:
        if self.init_image is None:
            if self.mask_image is not None:
                raise _FieldRule("mask_image", "needs init_image (the image it masks)")
            if self.strength is not None:
                raise _FieldRule("strength", "is only used with init_image")
        elif self.mode == "consistent":
            raise _FieldRule("init_image", "is only available in fast mode (Z-Image), not with PuLID-FLUX")
        return self

    @property
    def image_strength(self) -> float | None:
        """How far down its schedule an image-to-image job starts: the request's, else 0.6; None
        for text-to-image."""
        if self.init_image is None:
            return None
        return DEFAULT_STRENGTH if self.strength is None else self.strength

    @model_validator(mode="after")
    def _eta_needs_danrisi(self) -> GenerateRequest:
        if self.eta is not None and self.workflow == "z-image-simple":
            raise _FieldRule("eta", "is only used by z-image-danrisi")
        return self

    def sampling(self, mode: Mode) -> tuple[int, float]:
        """(steps, guidance_scale) for the mode that runs: the request's, else that mode's defaults."""
        steps, guidance = MODE_DEFAULTS[mode]
        return (steps if self.steps is None else self.steps,
                guidance if self.guidance_scale is None else self.guidance_scale)

    @property
    def size_note(self) -> str | None:
        """Set when aspect_ratio/megapixels asked for a side over MAX_SIDE: what was served instead."""
        return self._size_note

    @property
    def size_from_init_image(self) -> bool:
        """An init image with no size asked: the images take its size (serving/init_image.py)."""
        return self.width is None

    @model_validator(mode="after")
    def _size(self) -> GenerateRequest:
        explicit = self.width is not None or self.height is not None
        by_ratio = self.aspect_ratio is not None or self.megapixels is not None
        if explicit and by_ratio:
            raise _FieldRule("aspect_ratio", "give either width/height or aspect_ratio/megapixels, not both")
        if by_ratio:
            ratio, megapixels = self.aspect_ratio or "1:1", self.megapixels or 1.0
            self.width, self.height = size_for_aspect_ratio(ratio, megapixels)
            wanted = _exact_size(ratio, megapixels)
            if max(wanted) > MAX_SIDE:
                self._size_note = (
                    f"{ratio} at {megapixels:g} megapixels is {wanted[0]:.0f}x{wanted[1]:.0f}, over the "
                    f"{MAX_SIDE}-pixel side limit: scaled down to {self.width}x{self.height}, same ratio")
        elif explicit or self.init_image is None:
            self.width = self.width or 1024
            self.height = self.height or 1024
        return self


class _FieldRule(ValueError):
    """A cross-field rule that names the field it blames."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(rule)
        self.field = field
        self.rule = rule


def _exact_size(aspect_ratio: str, megapixels: float) -> tuple[float, float]:
    rw, rh = ASPECT_RATIOS[aspect_ratio]
    height = math.sqrt(megapixels * MEGAPIXEL * rh / rw)
    return height * rw / rh, height


def size_for_aspect_ratio(aspect_ratio: str, megapixels: float) -> tuple[int, int]:
    """Width and height near `megapixels` at the ratio, each a multiple of 16 within bounds. A size
    with a side over MAX_SIDE is scaled down whole, so the ratio is kept (fewer megapixels)."""
    width, height = _exact_size(aspect_ratio, megapixels)
    scale = min(1.0, MAX_SIDE / max(width, height))

    def snap(side: float) -> int:
        return min(MAX_SIDE, max(MIN_SIDE, SIZE_MULTIPLE * round(side * scale / SIZE_MULTIPLE)))

    return snap(width), snap(height)


def _constraints(field: str) -> dict[str, Any]:
    """A field's declared bounds (ge, le, multiple_of, min/max_length, allow_inf_nan): a
    GenerateRequest field, or a LoRA's (`loras.<i>.<name>`)."""
    found: dict[str, Any] = {}
    parts = field.split(".")
    model_field = (LoraRef.model_fields[parts[2]] if parts[0] == "loras" and len(parts) == 3
                   else GenerateRequest.model_fields[field])
    for item in model_field.metadata:
        for name in ("gt", "ge", "le", "multiple_of", "min_length", "max_length", "allow_inf_nan"):
            if getattr(item, name, None) is not None:
                found[name] = getattr(item, name)
    return found


def input_limits() -> dict[str, Any]:
    """The capabilities' `limits` that come from the request schema (the deployment adds its own)."""
    def span(field: str) -> list[int | float]:
        bounds = _constraints(field)
        return [bounds["ge"], bounds["le"]]

    return {
        "num_images": span("num_images"), "side": span("width"),
        "size_multiple": _constraints("width")["multiple_of"], "steps": span("steps"),
        "guidance_scale": span("guidance_scale"), "prompt_chars": _constraints("prompt")["max_length"],
        "seed": span("seed"), "aspect_ratios": list(ASPECT_RATIOS), "output_formats": list(get_args(ImageFormat)),
        "id_weight": span("id_weight"), "loras": MAX_LORAS, "lora_scale": [-MAX_LORA_SCALE, MAX_LORA_SCALE],
        "strength": {"above": _constraints("strength")["gt"], "max": _constraints("strength")["le"],
                     "default": DEFAULT_STRENGTH},
        "priorities": list(get_args(Priority)),
    }


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
    rule = _rule(first["type"], field, first.get("ctx") or {})
    if rule is None:
        rule = first["msg"].removeprefix("Value error, ")
        rule = rule[:1].lower() + rule[1:]
    return JobError("invalid_input", rule, field=field)


def _rule(kind: str, field: str, ctx: dict[str, Any]) -> str | None:
    """Our wording of a bound a field declares, with both ends of a range (None: pydantic's own)."""
    if kind == "string_unicode":
        return "must be valid Unicode text (no lone surrogate \\ud800-\\udfff)"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    nested = field.split(".")
    if field not in GenerateRequest.model_fields and not (
            nested[0] == "loras" and len(nested) == 3 and nested[2] in LoraRef.model_fields):
        return None
    bounds = _constraints(field)
    if kind in ("greater_than_equal", "less_than_equal", "finite_number") and {"ge", "le"} <= bounds.keys():
        finite = "a finite number " if bounds.get("allow_inf_nan") is False else ""
        return f"must be {finite}between {_number(bounds['ge'])} and {_number(bounds['le'])}"
    if kind in ("greater_than", "less_than_equal", "finite_number") and {"gt", "le"} <= bounds.keys():
        return f"must be a finite number greater than {_number(bounds['gt'])} and at most {_number(bounds['le'])}"
    if kind == "multiple_of":
        return f"must be a multiple of {bounds['multiple_of']}"
    if kind == "string_too_long":
        return f"must be at most {bounds['max_length']} characters"
    if kind == "too_long":
        return f"must have at most {bounds['max_length']} items"
    if kind == "string_too_short":
        return "must not be empty"
    return None


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"
