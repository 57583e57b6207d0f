"""PuLID modules: published checkpoint layout, attention maths, tiny forward shapes."""

import math

import torch

from models.pulid_modules import IDFormer, PerceiverAttentionCA, PuLIDModules


def published_pulid_flux_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of pulid_flux_v0.9.1.safetensors, written from the public PuLID source:
    ToTheBeginning/PuLID pulid/encoders_transformer.py (IDFormer(dim=1024, depth=10, dim_head=64,
    heads=16, num_id_token=5, num_queries=32, output_dim=2048, ff_mult=4); FeedForward =
    Sequential(LayerNorm, Linear(no bias), GELU, Linear(no bias)); mapping_i / id_embedding_mapping =
    Sequential(Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear) with 1024 inside and
    1280 in; PerceiverAttention(CA): norm1 (kv side), norm2, to_q, to_kv, to_out, no biases) and
    pulid/pipeline_flux.py (pulid_ca = ModuleList of 19//2 + 1 + 38//4 + 1 = 20 PerceiverAttentionCA(
    dim=3072, dim_head=128, heads=16, kv_dim=2048); checkpoint prefixes = attribute names)."""
    layout: dict[str, tuple[int, ...]] = {
        "pulid_encoder.latents": (1, 32, 1024),
        "pulid_encoder.proj_out": (1024, 2048),
    }

    def mlp(prefix: str, in_dim: int, out_dim: int) -> None:
        for idx, (rows, cols) in {"0": (1024, in_dim), "3": (1024, 1024), "6": (out_dim, 1024)}.items():
            layout[f"{prefix}.{idx}.weight"] = (rows, cols)
            layout[f"{prefix}.{idx}.bias"] = (rows,)
        for idx in ("1", "4"):
            layout[f"{prefix}.{idx}.weight"] = (1024,)
            layout[f"{prefix}.{idx}.bias"] = (1024,)

    def attention(prefix: str, dim: int, kv_dim: int, inner: int) -> None:
        layout.update({
            f"{prefix}.norm1.weight": (kv_dim,), f"{prefix}.norm1.bias": (kv_dim,),
            f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
            f"{prefix}.to_q.weight": (inner, dim), f"{prefix}.to_kv.weight": (2 * inner, kv_dim),
            f"{prefix}.to_out.weight": (dim, inner),
        })

    for i in range(10):
        attention(f"pulid_encoder.layers.{i}.0", 1024, 1024, 16 * 64)
        layout[f"pulid_encoder.layers.{i}.1.0.weight"] = (1024,)
        layout[f"pulid_encoder.layers.{i}.1.0.bias"] = (1024,)
        layout[f"pulid_encoder.layers.{i}.1.1.weight"] = (4096, 1024)
        layout[f"pulid_encoder.layers.{i}.1.3.weight"] = (1024, 4096)
    for i in range(5):
        mlp(f"pulid_encoder.mapping_{i}", 1024, 1024)
    mlp("pulid_encoder.id_embedding_mapping", 1280, 1024 * 5)
    for n in range(20):
        attention(f"pulid_ca.{n}", 3072, 2048, 16 * 128)
    return layout


def test_full_size_layout_matches_published_checkpoint():
    with torch.device("meta"):
        modules = PuLIDModules.flux_dev()
    ours = {k: tuple(v.shape) for k, v in modules.state_dict().items()}
    expected = published_pulid_flux_layout()
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}


def test_ca_matches_published_attention_formula():
    torch.manual_seed(0)
    ca = PerceiverAttentionCA(dim=12, kv_dim=8, heads=2, dim_head=4)
    id_tokens, img = torch.randn(2, 3, 8), torch.randn(2, 5, 12)
    # published maths: q from normed image tokens, k/v from normed id tokens, logits scaled by
    # dim_head^-1/2 (split as dim_head^-1/4 on each side), softmax over the id tokens
    x, latents = ca.norm1(id_tokens), ca.norm2(img)
    q = ca.to_q(latents).view(2, 5, 2, 4).transpose(1, 2)
    k, v = (t.view(2, 3, 2, 4).transpose(1, 2) for t in ca.to_kv(x).chunk(2, dim=-1))
    s = 1 / math.sqrt(math.sqrt(4))
    weight = torch.softmax((q * s) @ (k * s).transpose(-2, -1), dim=-1)
    expected = ca.to_out((weight @ v).permute(0, 2, 1, 3).reshape(2, 5, -1))
    torch.testing.assert_close(ca(id_tokens, img), expected)


def test_idformer_tokens_shape_and_dependence_on_inputs():
    torch.manual_seed(0)
    former = IDFormer(dim=16, depth=5, dim_head=8, heads=2, num_id_token=2, num_queries=4, output_dim=24,
                      ff_mult=2, id_cond_dim=20, vit_dim=12, mapping_dim=16)
    id_cond = torch.randn(3, 20)
    hidden = [torch.randn(3, 7, 12) for _ in range(5)]
    tokens = former(id_cond, hidden)
    assert tokens.shape == (3, 4, 24)
    changed = former(id_cond, hidden[:4] + [hidden[4] + 1])
    assert not torch.allclose(tokens, changed), "the deepest ViT scale must reach the output"
    assert not torch.allclose(tokens, former(id_cond + 1, hidden))
