"""The job input contract under fuzzing: any JSON a client sends is either a request or one clear
`JobError` naming the field, never another exception and never a traceback."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from serving.errors import JobError
from serving.schema import CapabilitiesRequest, GenerateRequest, parse_job_input

FIELDS = set(GenerateRequest.model_fields)
WITH_FIELD = re.compile(r"^(?P<code>[a-z_]+): (?P<field>[A-Za-z0-9_.]+): (?P<rule>.+)$", re.S)
WITHOUT_FIELD = re.compile(r"^(?P<code>[a-z_]+): (?P<rule>.+)$", re.S)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
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
VALID_CONSISTENT = {**VALID, "mode": "consistent", "reference_image": "aGk=", "id_weight": 1.0, "identity_start_step": 1}
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
        assert 64 <= parsed.width <= 2048 and 64 <= parsed.height <= 2048
        assert parsed.width % 16 == 0 and parsed.height % 16 == 0
        assert 1 <= parsed.num_images <= 16 and parsed.prompt.strip()
        for mode in ("fast", "consistent"):
            steps, guidance = parsed.sampling(mode)
            assert 1 <= steps <= 50 and 0 <= guidance <= 20
        assert (parsed.mode == "consistent") == (parsed.reference_image is not None)
        assert parsed.eta is None or (0 <= parsed.eta <= 1 and parsed.workflow != "z-image-simple")


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
