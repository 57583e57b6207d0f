"""PuLID-FLUX modules: the ID encoder (IDFormer) and the identity cross-attention layers.

Written from the published architecture (PuLID-FLUX v0.9.1). Attribute names mirror the published
checkpoint so that ``pulid_flux_v0.9.1.safetensors`` loads with ``strict=True`` and no key renaming:
its top-level prefixes are ``pulid_encoder.`` (IDFormer) and ``pulid_ca.`` (the CA layers).
Every size is a constructor argument so the tests and the demo can build a tiny twin.
"""

from __future__ import annotations

import torch
from torch import nn


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm MLP; a plain Sequential so its keys read ``.0`` (norm), ``.1``, ``.3`` (linears)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


def mapping_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Three-linear MLP with LayerNorm + LeakyReLU: the layout of ``mapping_i`` and ``id_embedding_mapping``."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, out_dim),
    )


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to a context ``x``.

    With ``attend_to_latents`` the keys/values are ``concat(x, latents)`` (IDFormer's resampler);
    without it they are ``x`` alone (the CA layers inside FLUX, where the latents are image tokens).
    """

    def __init__(self, dim: int, kv_dim: int, heads: int, dim_head: int, attend_to_latents: bool) -> None:
        super().__init__()
        if attend_to_latents and kv_dim != dim:
            raise ValueError("self+cross attention needs kv_dim == dim")
        inner = heads * dim_head
        self.heads = heads
        self.attend_to_latents = attend_to_latents
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        kv_input = torch.cat((x, latents), dim=1) if self.attend_to_latents else x
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        q = self.to_q(latents)
        b, n, _ = latents.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        # softmax in float32: the published layers run in bf16 and are unstable otherwise
        out = nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class PerceiverAttentionCA(PerceiverAttention):
    """Identity cross-attention inside FLUX: image tokens (queries) attend to the id tokens."""

    def __init__(self, *, dim: int = 3072, kv_dim: int = 2048, heads: int = 16, dim_head: int = 128) -> None:
        super().__init__(dim, kv_dim, heads, dim_head, attend_to_latents=False)


class IDFormer(nn.Module):
    """Perceiver resampler: (id_cond, 5 ViT hidden states) -> ``num_queries`` id tokens.

    ``id_cond`` (ArcFace 512 + EVA projection 768 = 1280) becomes ``num_id_token`` tokens that join
    the learned queries; each of the 5 ViT scales is mapped to ``dim`` and read by ``depth // 5``
    consecutive layers, shallow scales first.
    """

    num_scales = 5

    def __init__(
        self,
        dim: int = 1024,
        depth: int = 10,
        dim_head: int = 64,
        heads: int = 16,
        num_id_token: int = 5,
        num_queries: int = 32,
        output_dim: int = 2048,
        ff_mult: int = 4,
        id_cond_dim: int = 1280,
        vit_dim: int = 1024,
        mapping_dim: int = 1024,
    ) -> None:
        super().__init__()
        if depth % self.num_scales:
            raise ValueError(f"depth must be a multiple of {self.num_scales}")
        self.dim = dim
        self.num_id_token = num_id_token
        self.num_queries = num_queries
        self.layers_per_scale = depth // self.num_scales
        scale = dim**-0.5
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) * scale)
        self.proj_out = nn.Parameter(torch.randn(dim, output_dim) * scale)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, dim, heads, dim_head, attend_to_latents=True), feed_forward(dim, ff_mult)
            ])
            for _ in range(depth)
        )
        for i in range(self.num_scales):
            setattr(self, f"mapping_{i}", mapping_mlp(vit_dim, mapping_dim, dim))
        self.id_embedding_mapping = mapping_mlp(id_cond_dim, mapping_dim, dim * num_id_token)

    def forward(self, id_cond: torch.Tensor, vit_hidden: list[torch.Tensor]) -> torch.Tensor:
        """id_cond (B, id_cond_dim), vit_hidden 5 x (B, L, vit_dim) -> (B, num_queries, output_dim)."""
        id_tokens = self.id_embedding_mapping(id_cond).reshape(id_cond.shape[0], self.num_id_token, self.dim)
        latents = torch.cat((self.latents.expand(id_cond.shape[0], -1, -1), id_tokens), dim=1)
        for i in range(self.num_scales):
            context = torch.cat((id_tokens, getattr(self, f"mapping_{i}")(vit_hidden[i])), dim=1)
            for attn, ff in self.layers[i * self.layers_per_scale : (i + 1) * self.layers_per_scale]:
                latents = latents + attn(context, latents)
                latents = latents + ff(latents)
        return latents[:, : self.num_queries] @ self.proj_out


class PuLIDModules(nn.Module):
    """Everything in the PuLID checkpoint: ``pulid_encoder`` (IDFormer) and ``pulid_ca`` (CA layers).

    ``num_ca`` for FLUX.1-dev (19 double, 38 single blocks, CA after every 2nd / 4th one) is
    ceil(19/2) + ceil(38/4) = 10 + 10 = 20.
    """

    def __init__(self, encoder: IDFormer, num_ca: int, hidden_dim: int, id_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.pulid_encoder = encoder
        self.pulid_ca = nn.ModuleList(
            PerceiverAttentionCA(dim=hidden_dim, kv_dim=id_dim, heads=heads, dim_head=dim_head) for _ in range(num_ca)
        )

    @classmethod
    def flux_dev(cls) -> PuLIDModules:
        """The published PuLID-FLUX v0.9.1 sizes (build under ``torch.device('meta')`` to skip allocation)."""
        return cls(IDFormer(), num_ca=20, hidden_dim=3072, id_dim=2048, heads=16, dim_head=128)
