"""The job input contract under fuzzing: any JSON a client sends is either a request or one clear
`JobError` naming the field, never another exception and never a traceback."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from hypothesis import example, given, settings, strategies as st

from serving.errors import JobError
from serving.schema import (
    ASPECT_RATIOS, MAX_SIDE, MEGAPIXEL, SIZE_MULTIPLE, CapabilitiesRequest, GenerateRequest, input_limits,
    parse_job_input,
)
from tests.conftest import run_job

FIELDS = set(GenerateRequest.model_fields)
WITH_FIELD = re.compile(r"^(?P<code>[a-z_]+): (?P<field>[A-Za-z0-9_.]+): (?P<rule>.+)$", re.S)
WITHOUT_FIELD = re.compile(r"^(?P<code>[a-z_]+): (?P<rule>.+)$", re.S)

# any text JSON can carry: every code point, lone surrogates and control characters included
characters = (st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
              | st.sampled_from("\x00\x07\x1b\x7f\x85\u2028\ufeff\n\t\r"))
any_text = st.text(characters, max_size=20)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
STRING_FIELDS = [name for name, info in GenerateRequest.model_fields.items() if "str" in str(info.annotation)
                 or "Literal" in str(info.annotation)]
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(sorted(FIELDS)) | st.text(min_size=1, max_size=12)

VALID = {
    "prompt": "a fox", "negative_prompt": "", "num_images": 2, "width": 64, "height": 64, "steps": 4,
    "guidance_scale": 1.0, "seed": 3, "workflow": "auto", "output_format": "webp", "output_quality": 80,
    "delivery": "base64", "fallback": "none",
}
VALID_CONSISTENT = {
    **VALID, "mode": "consistent", "reference_image": "aGk=", "id_weight": 1.0, "identity_start_step": 1
}
# values near the edges of each field's domain, plus the wrong types
edge_values = json_values | st.sampled_from([
    0, -1, 1, 15, 16, 17, 63, 64, 2048, 2049, 2**32, 2**32 - 1, 2**64, 1.0, 0.5, float("nan"), float("inf"),
    -0.0, 20.0, 20.0001, 3.0, 3.5, True, False, "", " ", "\n", "x" * 2001, "1:1", "7:5", "png", "gif", "url",
    "consistent", "fast", "z-image-danrisi", "capabilities", "generate", None, [], {},
])


def check(raw: Any) -> None:
    try:
        parsed = parse_job_input(raw)
    except JobError as err:
        message = err.message
        assert "Traceback" not in message and "pydantic" not in message.lower()
        match = WITH_FIELD.match(message) or WITHOUT_FIELD.match(message)
        assert match, message
        assert match["code"] == "invalid_input"
        if err.field is not None:
            assert WITH_FIELD.match(message) and match["field"] == err.field
            top = err.field.split(".")[0]
            assert top in FIELDS or top in ("input", "action") or (isinstance(raw, dict) and top in raw), message
        assert err.rule.strip() and len(message) < 500, message
        return
    assert isinstance(parsed, (GenerateRequest, CapabilitiesRequest))
    if isinstance(parsed, GenerateRequest):  # what passes is within the documented limits
        if parsed.size_from_init_image:  # the init image's size, decided once it is loaded
            assert parsed.init_image is not None and parsed.height is None
        else:
            assert 64 <= parsed.width <= 2048 and 64 <= parsed.height <= 2048
            assert parsed.width % 16 == 0 and parsed.height % 16 == 0
        assert 1 <= parsed.num_images <= 16 and parsed.prompt.strip()
        for mode in ("fast", "consistent"):
            steps, guidance = parsed.sampling(mode)
            assert 1 <= steps <= 50 and 0 <= guidance <= 20
        assert (parsed.mode == "consistent") == (parsed.reference_image is not None)
        assert parsed.eta is None or (0 <= parsed.eta <= 1 and parsed.workflow != "z-image-simple")
        if parsed.init_image is None:
            assert parsed.mask_image is None and parsed.strength is None and parsed.image_strength is None
        else:
            assert parsed.mode == "fast" and 0 < parsed.image_strength <= 1
        for text in (parsed.prompt, parsed.negative_prompt):  # what reaches the tokenizer encodes
            text.encode("utf-8")
            assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", text)


@settings(max_examples=300, deadline=None)
@given(json_values | st.dictionaries(field_names, json_values, max_size=6))
def test_arbitrary_json_is_a_request_or_a_clear_error(raw):
    check(raw)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([VALID, VALID_CONSISTENT]), field_names, edge_values, st.booleans())
def test_near_valid_input_with_one_field_mutated(base, name, value, drop):
    raw = dict(base)
    if drop:
        raw.pop(name, None)
    else:
        raw[name] = value
    check(raw)


def test_the_valid_bases_are_valid():
    assert isinstance(parse_job_input(VALID), GenerateRequest)
    assert parse_job_input(VALID_CONSISTENT).mode == "consistent"
    assert isinstance(parse_job_input({"action": "capabilities"}), CapabilitiesRequest)


def test_unknown_fields_are_named_without_garbling_the_message():
    def message(raw: dict[str, Any]) -> str:
        try:
            parse_job_input(raw)
        except JobError as err:
            return err.message
        raise AssertionError("accepted")

    assert message({"prompt": "x", "colour": "red"}) == "invalid_input: colour: unknown field"
    assert message({"prompt": "x", "a: b": 1}) == "invalid_input: input: unknown field 'a: b'"
    assert message({"prompt": "x", "line\nbreak": 1}) == "invalid_input: input: unknown field 'line\\nbreak'"
    long = message({"prompt": "x", "k" * 10_000: 1})
    assert long.startswith("invalid_input: input: unknown field 'kkk") and len(long) < 100


def test_steps_and_guidance_default_for_the_mode_that_runs():
    fast = parse_job_input({"prompt": "x"})
    assert fast.sampling("fast") == (8, 0.0) and fast.sampling("consistent") == (20, 4.0)
    chosen = parse_job_input({"prompt": "x", "steps": 6, "guidance_scale": 0.0})
    assert chosen.sampling("fast") == chosen.sampling("consistent") == (6, 0.0)
    consistent = {"prompt": "x", "mode": "consistent", "reference_image": "aGk="}
    assert parse_job_input({**consistent, "identity_start_step": 19}).identity_start_step == 19
    with pytest.raises(JobError, match="identity_start_step: must be less than steps"):
        parse_job_input({**consistent, "identity_start_step": 20})
    with pytest.raises(JobError, match="identity_start_step: must be less than steps"):
        parse_job_input({**consistent, "identity_start_step": 5, "steps": 5})


def test_eta_is_a_danrisi_setting_between_0_and_1():
    assert parse_job_input({"prompt": "x", "workflow": "z-image-danrisi", "eta": 0.25}).eta == 0.25
    assert parse_job_input({"prompt": "x", "eta": 1}).eta == 1.0  # auto: the worker checks what it resolves to
    assert parse_job_input({"prompt": "x", "workflow": "z-image-danrisi"}).eta is None  # the worker's 0.5
    with pytest.raises(JobError, match=r"^invalid_input: eta: is only used by z-image-danrisi$"):
        parse_job_input({"prompt": "x", "workflow": "z-image-simple", "eta": 0.5})
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(JobError, match=r"^invalid_input: eta: "):
            parse_job_input({"prompt": "x", "workflow": "z-image-danrisi", "eta": bad})


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(STRING_FIELDS), any_text | st.text(characters, min_size=1990, max_size=2010))
def test_any_text_in_any_string_field_is_a_request_or_names_that_field(name, text):
    raw = {**(VALID_CONSISTENT if name == "reference_image" else VALID), name: text}
    check(raw)
    try:
        parse_job_input(raw)
    except JobError as err:
        assert err.field in (name, "reference_image", "aspect_ratio"), err.message  # cross-field rules name theirs


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize(("text", "rule"), [
    ("a \ud800 b", "must be valid Unicode text (no lone surrogate \\ud800-\\udfff)"),
    ("a \udfff", "must be valid Unicode text (no lone surrogate \\ud800-\\udfff)"),
    ("a\x00b", "must not contain control characters other than tab, newline and carriage return: U+0000 at position 1"),
    ("ab\x1b[31m",
     "must not contain control characters other than tab, newline and carriage return: U+001B at position 2"),
    ("a\x85", "must not contain control characters other than tab, newline and carriage return: U+0085 at position 1"),
])
def test_prompts_refuse_lone_surrogates_and_control_characters(field, text, rule):
    raw = {"prompt": "x", field: text}
    with pytest.raises(JobError) as caught:
        parse_job_input(raw)
    assert caught.value.message == f"invalid_input: {field}: {rule}"


def test_prompts_keep_tabs_newlines_emoji_and_other_scripts():
    text = "a cat\r\n\twith a hat 🐱‍👤 猫 \u200b"
    parsed = parse_job_input({"prompt": text, "negative_prompt": text})
    assert parsed.prompt == parsed.negative_prompt == text


@pytest.mark.parametrize("ratio", sorted(ASPECT_RATIOS))
@pytest.mark.parametrize("megapixels", [0.01, 0.25, 1.0, 2.0, 2.5, 3.0, 4.0])
def test_aspect_ratio_and_megapixels_keep_the_ratio_and_say_when_scaled_down(ratio, megapixels):
    parsed = parse_job_input({"prompt": "x", "aspect_ratio": ratio, "megapixels": megapixels})
    rw, rh = ASPECT_RATIOS[ratio]
    exact_height = (megapixels * MEGAPIXEL * rh / rw) ** 0.5
    exact_width = exact_height * rw / rh
    scale = min(1.0, MAX_SIDE / max(exact_width, exact_height))
    assert parsed.width % SIZE_MULTIPLE == 0 and parsed.height % SIZE_MULTIPLE == 0
    assert max(parsed.width, parsed.height) <= MAX_SIDE
    # each side is the ratio's exact side (scaled to fit) snapped to 16: the ratio is kept
    assert abs(parsed.width - exact_width * scale) <= SIZE_MULTIPLE / 2
    assert abs(parsed.height - exact_height * scale) <= SIZE_MULTIPLE / 2
    if scale < 1:
        assert parsed.size_note is not None and ratio in parsed.size_note
        assert f"scaled down to {parsed.width}x{parsed.height}, same ratio" in parsed.size_note
    else:
        assert parsed.size_note is None


def test_sixteen_by_nine_at_four_megapixels_is_2048_by_1152():
    parsed = parse_job_input({"prompt": "x", "aspect_ratio": "16:9", "megapixels": 4})
    assert (parsed.width, parsed.height) == (2048, 1152)
    assert parsed.size_note == ("16:9 at 4 megapixels is 2731x1536, over the 2048-pixel side limit: "
                                "scaled down to 2048x1152, same ratio")
    assert parse_job_input({"prompt": "x", "width": 2048, "height": 1536}).size_note is None


RANGE_FIELDS = {"num_images": "num_images", "side": "width", "steps": "steps", "guidance_scale": "guidance_scale",
                "seed": "seed", "id_weight": "id_weight"}


@pytest.mark.parametrize(("limit", "field"), sorted(RANGE_FIELDS.items()))
def test_capability_limits_are_the_bounds_the_schema_enforces(limit, field):
    low, high = input_limits()[limit]
    base = VALID_CONSISTENT if field == "id_weight" else {**VALID, "steps": None}
    base = {k: v for k, v in base.items() if v is not None}
    step = SIZE_MULTIPLE if field == "width" else 1 if isinstance(high, int) else 0.001
    for value in (low, high):
        parse_job_input({**base, field: value})
    for value in (low - step, high + step):
        with pytest.raises(JobError, match=rf"^invalid_input: {field}: must be (a finite number )?between "):
            parse_job_input({**base, field: value})


def test_capability_limits_name_the_rest_of_the_contract():
    limits = input_limits()
    assert limits["size_multiple"] == SIZE_MULTIPLE and limits["aspect_ratios"] == list(ASPECT_RATIOS)
    assert limits["output_formats"] == ["png", "webp", "jpeg"]
    parse_job_input({"prompt": "x" * limits["prompt_chars"]})
    with pytest.raises(
        JobError, match=rf"^invalid_input: prompt: must be at most {limits['prompt_chars']} characters$"
    ):
        parse_job_input({"prompt": "x" * (limits["prompt_chars"] + 1)})


# -- the same contract end to end: the handler on the demo model -------------------------------------
HANDLER_BASE = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "guidance_scale": 1.0, "seed": 1}


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(STRING_FIELDS + ["prompt", "negative_prompt"] * 3), any_text)
@example("prompt", "a \ud800 b")  # the tokenizer raised on these before the schema refused them
@example("negative_prompt", "\udfff")
@example("prompt", "x\x00y")
@example("prompt", "a cat\r\n\t🐱 猫")
@example("reference_image", "https://exämple.com/a.png")
def test_the_worker_answers_any_text_with_images_or_an_error_naming_the_field(handler_module, name, text):
    """Whatever text reaches the tokenizer, the encoders or the reference decoder: a result or one
    clear error, never an exception, a traceback or an internal_error."""
    from serving.local_run import collect

    raw = {**HANDLER_BASE, name: text}
    if name == "reference_image":
        raw["mode"] = "consistent"
    result = asyncio.run(collect(handler_module.WORKER.run_job, {"id": "fuzz", "input": raw}))
    if "error" in result:
        match = WITH_FIELD.match(result["error"])
        assert match, result["error"]
        codes = {"reference_image": {"invalid_input", "invalid_reference"},
                 "init_image": {"invalid_input", "invalid_image"}}.get(name, {"invalid_input"})
        assert match["code"] in codes, result
        assert match["field"] in (name, "reference_image", "aspect_ratio"), result
    else:
        assert result["errors"] == [] and len(result["images"]) == 1 and result["images_completed"] == 1, result


def test_the_summary_says_when_the_size_was_scaled_down_to_the_side_limit(handler_module):
    job = {"prompt": "a wide view", "aspect_ratio": "16:9", "megapixels": 4, "steps": 1, "output_format": "jpeg"}
    result = run_job(handler_module, job)  # the demo's noise image may pass the 1 MB chunk limit: settings say
    assert (result["settings"]["width"], result["settings"]["height"]) == (2048, 1152)
    assert result["size_note"].endswith("scaled down to 2048x1152, same ratio")
    assert "size_note" not in run_job(handler_module, {**job, "megapixels": 0.01})


def test_priority_is_interactive_or_background_or_left_out(handler_module):
    assert parse_job_input({"prompt": "x"}).priority is None
    assert parse_job_input({"prompt": "x", "priority": "background"}).priority == "background"
    with pytest.raises(JobError, match=r"^invalid_input: priority: must be 'interactive' or 'background'$"):
        parse_job_input({"prompt": "x", "priority": "urgent"})
    assert input_limits()["priorities"] == ["interactive", "background"]
    served = run_job(handler_module, {"prompt": "x", "priority": "interactive", "width": 64, "height": 64, "steps": 1})
    assert served["errors"] == [] and served["settings"]["priority"] == "interactive"
