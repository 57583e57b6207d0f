"""The embedded demo model: built deterministically, loaded by the real loading code."""

from __future__ import annotations

import json

from models.z_image_demo import DEMO_MODEL_INFO, MODEL_INFO_FILE, build_tokenizer, ensure_demo_model
from pipelines.z_image import ModelIdentity, ZImageEngine


def test_two_builds_write_identical_weights(tmp_path):
    first = ensure_demo_model(tmp_path / "a")
    second = ensure_demo_model(tmp_path / "b")
    for weights in sorted(first.rglob("*.safetensors")):
        twin = second / weights.relative_to(first)
        assert weights.read_bytes() == twin.read_bytes(), weights.name
    assert json.loads((first / MODEL_INFO_FILE).read_text()) == DEMO_MODEL_INFO


def test_demo_folder_loads_through_the_real_loader_and_says_it_is_the_demo(tmp_path):
    folder = ensure_demo_model(tmp_path)
    engine = ZImageEngine.load(folder, "cpu")
    assert engine.identity == ModelIdentity(id="demo", revision="z-image-tiny-random-v1", demo=True)
    assert type(engine.pipe).__name__ == "ZImagePipeline"


def test_tokenizer_renders_the_z_image_chat_template():
    tokenizer = build_tokenizer()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("héllo").input_ids) == "héllo"
