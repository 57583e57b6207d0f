"""EVA02-CLIP vision tower (the image half of EVA02-CLIP-L-14-336), as PuLID uses it.

Parameter names follow the EVA-CLIP checkpoint's ``visual.*`` keys with the ``visual.`` prefix
removed, so ``EVA02_CLIP_L_336_psz14_s6B.pt`` loads after that strip (the rotary tables, which the
checkpoint stores as buffers, are recomputed here and not loaded). Layout: pre-norm blocks with
separate q/k/v projections (q and v biases only), 2D rotary position embedding on the patch tokens,
a LayerNorm after attention ("subln") and a SwiGLU MLP with its own LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class EVAVisionConfig:
    """Defaults are EVA02-CLIP-L-14-336's vision tower."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 2.6667
    embed_dim: int = 768
    rope_pretrain_grid: int = 16  # rotary frequencies were trained on a 224/14 = 16 grid
    hidden_every: int = 4  # PuLID reads the inputs of blocks 4, 8, 12, 16, 20
    num_hidden: int = 5
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotary on interleaved pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rope_tables(head_dim: int, grid: int, pretrain_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (grid*grid, head_dim): first half of each head rotates with the row, second with the column."""
    quarter = head_dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(0, 2 * quarter, 2).float() / (2 * quarter)))
    pos = torch.arange(grid).float() / grid * pretrain_grid
    axis = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (grid, head_dim/2)
    rows = axis[:, None, :].expand(grid, grid, -1)
    cols = axis[None, :, :].expand(grid, grid, -1)
    angles = torch.cat((rows, cols), dim=-1).reshape(grid * grid, head_dim)
    return angles.cos(), angles.sin()


class EVAAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = self.k_proj(x)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        # rotary on patch tokens only; the class token (index 0) keeps its features
        q = torch.cat((q[:, :, :1], q[:, :, 1:] * cos + _rotate_pairs(q[:, :, 1:]) * sin), dim=2)
        k = torch.cat((k[:, :, :1], k[:, :, 1:] * cos + _rotate_pairs(k[:, :, 1:]) * sin), dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=1e-6)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EVABlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = EVAAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = SwiGLU(width, mlp_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class EVAVisionTower(nn.Module):
    """Image (B, 3, S, S), CLIP-normalised -> (projected embedding (B, embed_dim), hidden states)."""

    def __init__(self, config: EVAVisionConfig) -> None:
        super().__init__()
        self.config = config
        grid = config.image_size // config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, config.width))
        self.blocks = nn.ModuleList(
            EVABlock(config.width, config.heads, int(config.width * config.mlp_ratio)) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.width, eps=1e-6)
        self.head = nn.Linear(config.width, config.embed_dim)
        cos, sin = rope_tables(config.width // config.heads, grid, config.rope_pretrain_grid)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(pixels)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)
        hidden: list[torch.Tensor] = []
        every, count = self.config.hidden_every, self.config.num_hidden
        for idx, block in enumerate(self.blocks):
            if 0 < idx <= every * count and idx % every == 0:
                hidden.append(x)
            x = block(x, cos, sin)
        return self.head(self.norm(x)[:, 0]), hidden


def load_eva_state_dict(tower: EVAVisionTower, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an EVA-CLIP checkpoint, whole CLIP (``visual.*`` keys) or vision only; rotary buffers are skipped.

    Training checkpoints may nest the weights under ``model`` / ``module`` / ``state_dict`` and
    prefix them with ``module.`` (DDP): EVA-CLIP's own loader accepts both, so this does too.
    """
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("visual.") for k in state_dict):
        state_dict = {k.removeprefix("visual."): v for k, v in state_dict.items() if k.startswith("visual.")}
    tower.load_state_dict({k: v for k, v in state_dict.items() if "rope." not in k}, strict=True)
