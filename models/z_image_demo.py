"""The embedded demo model: a tiny random-weight Z-Image pipeline built from the real classes.

It exists so the worker, its tests and `make run` work on a machine with no weights and no
network. It is written in diffusers format once (deterministically, from fixed seeds) and then
loaded by the very same code as the real Z-Image-Turbo weights. Its images are noise: it proves
the serving path, not image quality.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

DEMO_NAME = "z-image-tiny-random-v1"
MODEL_INFO_FILE = "model_info.json"
DEMO_MODEL_INFO = {"id": "demo", "revision": DEMO_NAME, "demo": True}

TEXT_HIDDEN = 32
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    """A byte-level Qwen2-style tokenizer with the chat template, made without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_alphabet))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_pipeline():
    """The tiny pipeline with deterministic random weights (same shapes every time)."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_HIDDEN,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 512, 512],
    )
    with torch.no_grad():  # left uninitialised by construction in some versions: keep them finite
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    torch.manual_seed(1)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
        )
    )
    torch.manual_seed(2)
    vae = z_image_vae(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)
    return ZImagePipeline(
        scheduler=z_image_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def z_image_vae(block_out_channels: list[int], layers_per_block: int, norm_num_groups: int) -> AutoencoderKL:
    """Z-Image's VAE layout (Flux's: 16 latent channels, its scaling and shift, no quant convs)
    at the given widths; the demo model and the GPU benchmark's full-size model both use it."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=16,
        norm_num_groups=norm_num_groups,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def z_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Z-Image-Turbo's scheduler config: flow-match Euler, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def ensure_demo_model(cache_dir: Path) -> Path:
    """Return the demo model's directory, writing it first if absent (atomically, once)."""
    target = Path(cache_dir) / DEMO_NAME
    if (target / MODEL_INFO_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=target.parent))
    try:
        build_pipeline().save_pretrained(staging)
        (staging / MODEL_INFO_FILE).write_text(json.dumps(DEMO_MODEL_INFO, indent=2))
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first: its copy is identical
            if not (target / MODEL_INFO_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
