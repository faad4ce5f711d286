"""Inference form of MobileViT: BatchNorm folded into convolutions, token-major transformer, channels_last.

``deploy(model)`` returns a new module with the same logits (within 1e-4) that runs faster on CPU and GPU:

- every Conv2d -> BatchNorm2d pair becomes one Conv2d with a bias (BN costs a full pass over memory);
- in each MobileViT block, the 1x1 convolutions around the transformer become Linear layers applied to the
  tokens, so the map is unfolded once and folded once, and the transformer's final LayerNorm is folded
  into the following projection;
- weights and activations use the channels_last memory format, where oneDNN's convolutions are fastest
  (most of MobileViT's time is convolution);
- attention is PyTorch's fused ``scaled_dot_product_attention``;
- on CPU in eager mode, each convolution or Linear and the SiLU after it run as one oneDNN kernel
  (activations are memory-bound on small CPUs: a separate SiLU costs a full read and write of the map).

The result holds only inference layers (no BatchNorm statistics): train and fine-tune the original model.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Attention, ConvNormAct, InvertedResidual, Mlp, MobileViTBlock
from .model import MobileViT, _check_input


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A Conv2d with a bias computing ``bn(conv(x))`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused.to(conv.weight.device)


_ONEDNN = torch.backends.mkldnn.is_available()


def onednn_eager(x: Tensor) -> bool:
    """Whether oneDNN's fused kernels (conv/linear + activation in one pass) run: eager fp32 on CPU.

    While tracing, exporting or compiling, the plain aten ops are used instead, so exporters and
    ``torch.compile`` see standard operators (and do their own fusion).
    """
    return (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
    )


class FusedConv(nn.Module):
    """Conv2d with folded BatchNorm, then SiLU (if the block had one), as one oneDNN kernel in eager CPU."""

    def __init__(self, block: ConvNormAct):
        super().__init__()
        self.conv = fold_batchnorm(block.conv, block.bn)
        self.act = block.act if isinstance(block.act, nn.SiLU) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if onednn_eager(x):
            c = self.conv
            attr = "swish" if isinstance(self.act, nn.SiLU) else "none"
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups, attr, [], None
            )
        return self.act(self.conv(x))


def linear_silu(x: Tensor, linear: nn.Linear) -> Tensor:
    """``silu(linear(x))``, in one oneDNN kernel in eager CPU."""
    if onednn_eager(x):
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "swish", [], "")
    return F.silu(linear(x))


class FusedMlp(nn.Module):
    """Linear -> SiLU (one kernel) -> Linear; dropout is a no-op at inference."""

    def __init__(self, mlp: Mlp):
        super().__init__()
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(linear_silu(x, self.fc1))


class FusedInvertedResidual(nn.Module):
    """MobileNetV2 block with folded BatchNorm."""

    def __init__(self, block: InvertedResidual):
        super().__init__()
        self.expand = FusedConv(block.expand)
        self.dw = FusedConv(block.dw)
        self.project = FusedConv(block.project)
        self.use_residual = block.use_residual

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.use_residual else y


class FastAttention(nn.Module):
    """Attention with shapes taken from the weights, not the input (exports without shape arithmetic)."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads = attn.num_heads
        self.head_dim = attn.proj.in_features // attn.num_heads

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def _linear_from_conv1x1(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_ch, in_ch = weight.shape[:2]
    linear = nn.Linear(in_ch, out_ch, bias=True)
    with torch.no_grad():
        linear.weight.copy_(weight.reshape(out_ch, in_ch))
        linear.bias.copy_(bias if bias is not None else torch.zeros(out_ch))
    return linear.to(weight.device)


class TokenMobileViTBlock(nn.Module):
    """MobileViT block working on tokens between one unfold and one fold.

    ``conv_in`` (1x1) and ``conv_out`` (1x1 + folded BN + SiLU) act on every pixel independently, so they
    commute with the unfold/fold permutation: here they are Linear layers on the token tensor, and the
    transformer's final LayerNorm affine is folded into ``conv_out``'s weights.
    """

    def __init__(self, block: MobileViTBlock):
        super().__init__()
        self.patch_size = block.patch_size
        self.conv_local = FusedConv(block.conv_local)
        self.proj_in = _linear_from_conv1x1(block.conv_in.weight, block.conv_in.bias)
        self.transformer = _convert(block.transformer)
        norm = block.norm
        self.norm_eps = norm.eps
        out = fold_batchnorm(block.conv_out.conv, block.conv_out.bn)
        w = out.weight.reshape(out.out_channels, -1)
        self.proj_out = _linear_from_conv1x1(w * norm.weight, out.bias + w @ norm.bias)
        self.conv_fusion = FusedConv(block.conv_fusion)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        c, (h, w) = self.proj_out.out_features, x.shape[-2:]
        nh, nw = math.ceil(h / p), math.ceil(w / p)
        y = self.conv_local(x)
        if (nh * p, nw * p) != (h, w):  # the official bilinear resize to a multiple of the patch size
            y = F.interpolate(y, size=(nh * p, nw * p), mode="bilinear", align_corners=False)
        # [B, C, nh, p, nw, p] -> [B, p, p, nh, nw, C]: one copy (a free view of channels_last memory before it)
        tokens = y.reshape(-1, c, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(-1, nh * nw, c)
        tokens = self.transformer(self.proj_in(tokens))
        tokens = F.layer_norm(tokens, (self.proj_in.out_features,), eps=self.norm_eps)
        resized = (nh * p, nw * p) != (h, w)
        # SiLU does not commute with the resize, so it waits until after it when there is one
        tokens = self.proj_out(tokens) if resized else linear_silu(tokens, self.proj_out)
        # back to [B, C, H, W] laid out channels_last (one copy)
        y = tokens.reshape(-1, p, p, nh, nw, c).permute(0, 3, 1, 4, 2, 5).reshape(-1, nh * p, nw * p, c)
        y = y.permute(0, 3, 1, 2)
        if resized:
            y = F.silu(F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False))
        return self.conv_fusion(torch.cat((x, y), dim=1))


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, ConvNormAct):
        return FusedConv(module)
    if isinstance(module, InvertedResidual):
        return FusedInvertedResidual(module)
    if isinstance(module, MobileViTBlock):
        return TokenMobileViTBlock(module)
    if isinstance(module, Attention):
        return FastAttention(module)
    if isinstance(module, Mlp):
        return FusedMlp(module)
    if isinstance(module, nn.Dropout):
        return nn.Identity()
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module


class DeployedMobileViT(nn.Module):
    """Inference form of a :class:`~mobilevit.MobileViT` (see :func:`deploy`); same inputs and outputs."""

    def __init__(self, model: MobileViT, channels_last: bool = True):
        super().__init__()
        self.config = model.config
        self.weights_meta = dict(model.weights_meta)
        self.channels_last = channels_last
        self.stem = _convert(model.stem)
        self.stages = _convert(model.stages)
        self.final_conv = _convert(model.final_conv)
        self.num_features = model.num_features
        self.fc = model.fc

    @property
    def num_classes(self) -> int:
        return self.fc.out_features if isinstance(self.fc, nn.Linear) else 0

    def forward_features(self, x: Tensor) -> Tensor:
        _check_input(x, self.config.in_chans)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.final_conv(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@torch.no_grad()
def deploy(model: MobileViT, channels_last: bool = True) -> DeployedMobileViT:
    """Inference form of ``model`` (a new module in eval mode; ``model`` is left untouched).

    Logits equal the original's within 1e-4 in fp32. With ``channels_last`` (the default) weights and
    activations use that memory format; inputs in either format are accepted.
    """
    if not isinstance(model, MobileViT):
        raise TypeError(f"deploy() expects a mobilevit.MobileViT, got {type(model).__name__}")
    fast = DeployedMobileViT(copy.deepcopy(model).eval(), channels_last)
    if channels_last:
        fast.to(memory_format=torch.channels_last)
    return fast.eval().requires_grad_(False)
