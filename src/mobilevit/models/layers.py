"""Building blocks of MobileViT v1: conv-norm-act, MobileNetV2 block, transformer, MobileViT block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going below 90% of it."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional SiLU."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        dilation: int = 1,
    ):
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.SiLU() if act else nn.Identity()


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 project, residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: float, dilation: int = 1):
        super().__init__()
        hidden = make_divisible(round(in_ch * expansion), 8)
        self.expand = ConvNormAct(in_ch, hidden, 1)
        self.dw = ConvNormAct(hidden, hidden, 3, stride, groups=hidden, dilation=dilation)
        self.project = ConvNormAct(hidden, out_ch, 1, act=False)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.use_residual else y


class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection (rows ordered q | k | v)."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Sequential):
    """Linear -> SiLU -> Dropout -> Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)


class TransformerLayer(nn.Module):
    """Pre-norm transformer encoder layer."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, attn_dropout: float, ffn_dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, ffn_dim, ffn_dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


def unfold_patches(x: Tensor, patch: int) -> tuple[Tensor, tuple[int, int]]:
    """[B, D, H, W] -> tokens [B * patch^2, N, D], one sequence per pixel position inside a patch.

    A map whose sides are not multiples of ``patch`` is first resized bilinearly up to the next
    multiple, as the official implementation does. Returns the tokens and the original (H, W).
    """
    b, d, h, w = x.shape
    nh, nw = math.ceil(h / patch), math.ceil(w / patch)
    if (nh * patch, nw * patch) != (h, w):
        x = F.interpolate(x, size=(nh * patch, nw * patch), mode="bilinear", align_corners=False)
    x = x.reshape(b, d, nh, patch, nw, patch).permute(0, 3, 5, 2, 4, 1)
    return x.reshape(b * patch * patch, nh * nw, d), (h, w)


def fold_patches(tokens: Tensor, patch: int, size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`unfold_patches`: tokens back to a [B, D, H, W] map of the original size."""
    h, w = size
    nh, nw = math.ceil(h / patch), math.ceil(w / patch)
    bp, _, d = tokens.shape
    b = bp // (patch * patch)
    x = tokens.reshape(b, patch, patch, nh, nw, d).permute(0, 5, 3, 1, 4, 2).reshape(b, d, nh * patch, nw * patch)
    if (nh * patch, nw * patch) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x


class MobileViTBlock(nn.Module):
    """Local 3x3 conv, global transformer over unfolded patches, fold back, fuse with the input."""

    def __init__(
        self,
        channels: int,
        dim: int,
        depth: int,
        patch_size: int,
        num_heads: int,
        ffn_ratio: float,
        dropout: float,
        attn_dropout: float,
        ffn_dropout: float,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.conv_local = ConvNormAct(channels, channels, 3)
        self.conv_in = nn.Conv2d(channels, dim, 1, bias=False)
        ffn_dim = int(dim * ffn_ratio)
        self.transformer = nn.Sequential(
            *[TransformerLayer(dim, num_heads, ffn_dim, dropout, attn_dropout, ffn_dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.conv_out = ConvNormAct(dim, channels, 1)
        self.conv_fusion = ConvNormAct(2 * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_in(self.conv_local(x))
        tokens, size = unfold_patches(y, self.patch_size)
        tokens = self.norm(self.transformer(tokens))
        y = self.conv_out(fold_patches(tokens, self.patch_size, size))
        return self.conv_fusion(torch.cat((x, y), dim=1))
