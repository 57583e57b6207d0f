"""EVA02-CLIP vision tower: the EVA-CLIP checkpoint's layout, rotary tables, loading."""

import pytest
import torch

from models.eva_clip import EVAVisionConfig, EVAVisionTower, load_eva_state_dict, rope_tables


def published_eva02_l_336_visual_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the ``visual.*`` tensors of EVA02_CLIP_L_336_psz14_s6B.pt (prefix removed),
    written from the public EVA-CLIP source as PuLID vendors it (eva_clip/eva_vit_model.py,
    model_configs/EVA02-CLIP-L-14-336.json: width 1024, 24 layers, head width 64, mlp_ratio 2.6667,
    patch 14, image 336, embed_dim 768, qkv_bias (q_bias, v_bias), subln, naive SwiGLU (w1, w2,
    ffn_ln, w3), no layer scale, no mean pooling (final ``norm``), ``head`` Linear to 768).
    The rotary buffers (``rope.*``, ``blocks.N.attn.rope.*``) are left out: they are recomputed."""
    width, hidden = 1024, int(1024 * 2.6667)
    layout: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, width), "pos_embed": (1, (336 // 14) ** 2 + 1, width),
        "patch_embed.proj.weight": (width, 3, 14, 14), "patch_embed.proj.bias": (width,),
        "norm.weight": (width,), "norm.bias": (width,), "head.weight": (768, width), "head.bias": (768,),
    }
    for i in range(24):
        b = f"blocks.{i}"
        for norm, dim in (("norm1", width), ("norm2", width), ("attn.inner_attn_ln", width), ("mlp.ffn_ln", hidden)):
            layout[f"{b}.{norm}.weight"] = layout[f"{b}.{norm}.bias"] = (dim,)
        for proj in ("q_proj", "k_proj", "v_proj"):
            layout[f"{b}.attn.{proj}.weight"] = (width, width)
        layout[f"{b}.attn.q_bias"] = layout[f"{b}.attn.v_bias"] = (width,)
        layout[f"{b}.attn.proj.weight"], layout[f"{b}.attn.proj.bias"] = (width, width), (width,)
        for w, (rows, cols) in (("w1", (hidden, width)), ("w2", (hidden, width)), ("w3", (width, hidden))):
            layout[f"{b}.mlp.{w}.weight"], layout[f"{b}.mlp.{w}.bias"] = (rows, cols), (rows,)
    return layout


def test_full_size_tower_matches_the_eva_clip_checkpoint_layout():
    with torch.device("meta"):
        tower = EVAVisionTower(EVAVisionConfig())
    ours = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    expected = published_eva02_l_336_visual_layout()
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}


def test_rope_tables_follow_eva02_l_336_grid():
    cos, sin = rope_tables(head_dim=64, grid=24, pretrain_grid=16)
    assert cos.shape == sin.shape == (576, 64)
    freqs = 1.0 / 10000 ** (torch.arange(0, 32, 2).float() / 32)
    row, col = 5, 7
    angles = torch.cat([(row * 16 / 24 * freqs).repeat_interleave(2), (col * 16 / 24 * freqs).repeat_interleave(2)])
    torch.testing.assert_close(cos[row * 24 + col], angles.cos())
    torch.testing.assert_close(sin[row * 24 + col], angles.sin())


def test_eva_tower_hidden_states_and_checkpoint_loading():
    config = EVAVisionConfig(image_size=28, patch_size=14, width=16, layers=6, heads=2, embed_dim=8, hidden_every=1)
    torch.manual_seed(0)
    source, target = EVAVisionTower(config), EVAVisionTower(config)
    # an EVA-CLIP file holds the whole CLIP model and stores the rotary tables as buffers
    checkpoint = {f"visual.{k}": v for k, v in source.state_dict().items()}
    checkpoint |= {"visual.rope.freqs_cos": torch.zeros(4, 8), "text.token_embedding.weight": torch.zeros(3, 8)}
    load_eva_state_dict(target, checkpoint)
    pixels = torch.randn(2, 3, 28, 28)
    embed, hidden = target(pixels)
    assert embed.shape == (2, 8)
    assert [h.shape for h in hidden] == [(2, 5, 16)] * 5
    torch.testing.assert_close(embed, source(pixels)[0])


TINY = EVAVisionConfig(image_size=28, patch_size=14, width=16, layers=2, heads=2, embed_dim=8)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
])
def test_training_checkpoint_wrappers_are_unwrapped(wrap):
    torch.manual_seed(0)
    source, target = EVAVisionTower(TINY), EVAVisionTower(TINY)
    load_eva_state_dict(target, wrap({f"visual.{k}": v for k, v in source.state_dict().items()}))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
