"""DINOv2 vision transformers (Oquab et al., 2023), written to load the official checkpoints.

Attribute names follow the official `dinov2_vit*14_pretrain.pth` / `_reg4_pretrain.pth` files
(`cls_token`, `pos_embed`, `register_tokens`, `patch_embed.proj`, `blocks.N.{norm1,attn,ls1,norm2,
mlp,ls2}`, `norm`), so a checkpoint loads with a strict `load_state_dict`. They are part of the
checkpoint format: do not rename them.

The teacher output is the final-normed patch tokens as a (B, D, H/14, W/14) grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    ffn: str = "mlp"
    """"mlp" (GELU) or "swiglu" (ViT-g, the official fused w12/w3 layout)."""
    num_register_tokens: int = 0
    patch_size: int = 14
    pretrain_grid: int = 37
    """Positional embeddings were learnt for a 518 px image: 37 x 37 patches."""
    interpolate_offset: float = 0.1
    """The official code resizes positional embeddings by a scale factor of (n + 0.1) / 37 to avoid
    a floating-point off-by-one; 0 resizes to the exact size (what `transformers` does)."""
    interpolate_antialias: bool = False
    """The official `_reg` models resize with antialiasing (and offset 0)."""
    layerscale_init: float = 1e-5


VIT_CONFIGS = {
    "vits14": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vitb14": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vitl14": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": ViTConfig(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, h*w, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # the official rounding: 6144 -> 4096 for ViT-g
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, config.num_heads)
        self.ls1 = LayerScale(dim, config.layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = (SwiGLUFFN if config.ffn == "swiglu" else Mlp)(dim, 4 * dim)
        self.ls2 = LayerScale(dim, config.layerscale_init)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pretrain_grid**2, dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, dim)) if config.num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference; in every checkpoint
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def positional_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """(1, 1 + rows*cols, D) positional embeddings for a rows x cols patch grid."""
        grid = self.config.pretrain_grid
        if rows == cols == grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        patch_pos = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        offset = self.config.interpolate_offset
        if offset:
            resize = dict(scale_factor=((rows + offset) / grid, (cols + offset) / grid))
        else:
            resize = dict(size=(rows, cols))
        patch_pos = F.interpolate(patch_pos, mode="bicubic", align_corners=False,
                                  antialias=self.config.interpolate_antialias, **resize)
        assert patch_pos.shape[-2:] == (rows, cols)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(self.pos_embed.dtype)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images, H and W multiples of 14 -> (B, h*w, D) normed patch tokens."""
        b, _, height, width = images.shape
        p = self.config.patch_size
        assert height % p == 0 and width % p == 0, f"image size {height}x{width} is not a multiple of {p}"
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.positional_embedding(height // p, width // p).to(x.dtype)
        if self.register_tokens is not None:  # registers carry no positional embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 1 + self.config.num_register_tokens :]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, H/14, W/14) patch feature grid."""
        b, _, height, width = images.shape
        p = self.config.patch_size
        tokens = self.forward_tokens(images)
        return tokens.transpose(1, 2).reshape(b, -1, height // p, width // p)


def build_dinov2(arch: str, *, registers: bool = False) -> DinoVisionTransformer:
    """An uninitialised DINOv2 of `arch` ("vits14", ... "vitg14"), with 4 registers if asked."""
    config = VIT_CONFIGS[arch]
    if registers:  # as the official hub entry points build the _reg4 models
        config = replace(config, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    return DinoVisionTransformer(config)


def official_checkpoint_name(arch: str, *, registers: bool = False) -> str:
    """File name of the official checkpoint, as torch.hub caches it."""
    return f"dinov2_{arch}{'_reg4' if registers else ''}_pretrain.pth"


def official_checkpoint_url(arch: str, *, registers: bool = False) -> str:
    return f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/{official_checkpoint_name(arch, registers=registers)}"


