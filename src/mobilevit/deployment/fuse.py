"""Inference form of MobileViT: BatchNorm folded into convolutions, token-major transformer, channels_last.

``deploy(model)`` returns a new module with the same logits (within 1e-4) that runs faster on CPU and GPU:

- every Conv2d -> BatchNorm2d pair becomes one Conv2d with a bias (BN costs a full pass over memory);
- in each MobileViT block, the 1x1 convolutions around the transformer become Linear layers applied to the
  tokens, so the map is unfolded once and folded once, and the transformer's final LayerNorm is folded
  into the following projection;
- weights and activations use the channels_last memory format, where oneDNN's convolutions are fastest
  (most of MobileViT's time is convolution);
- transformer layers keep only the normalisation of their LayerNorms (the affines are folded into the
  Linear layers after them) and project queries, keys and values separately (the attention scale folded
  into the queries); attention is PyTorch's fused ``scaled_dot_product_attention``;
- on CPU in eager mode, each convolution or Linear and the SiLU after it run as one oneDNN kernel
  (activations are memory-bound on small CPUs: a separate SiLU costs a full read and write of the map).

``deploy`` also takes a :class:`~mobilevit.models.deeplabv3.MobileViTDeepLabV3`: its backbone gets the same
treatment, the ASPP and classifier convolutions their BatchNorm folded (and ReLU fused on CPU), the pooling
branch is broadcast instead of upsampled from 1x1 (the same values).

It also takes a :class:`~mobilevit.models.ssdlite.MobileViTSSDLite` detector: the backbone as above, BatchNorm
folded into the depthwise and pointwise convolutions of the extra layers and of every head (the projections
too; ReLU fused on CPU). The inference form keeps ``forward_raw``, ``decode_boxes``, ``postprocess`` and the
eval ``forward`` (detections in pixels).

The result holds only inference layers (no BatchNorm statistics): train and fine-tune the original model.
"""

from __future__ import annotations

import copy
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.backbone import MobileViT, _check_input
from ..models.deeplabv3 import ASPP, ConvBNReLU, DeepLabV3Config, MobileViTDeepLabV3
from ..models.layers import ConvNormAct, InvertedResidual, MobileViTBlock, TransformerLayer
from ..models.ssdlite import ConvBN, MobileViTSSDLite, SSDLiteConfig, SSDOutput


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


#: oneDNN's name of each activation that a convolution can apply in the same kernel.
_ONEDNN_ACTIVATIONS: dict[type[nn.Module], str] = {nn.SiLU: "swish", nn.ReLU: "relu"}


class FusedConv(nn.Module):
    """Conv2d with folded BatchNorm, then its SiLU or ReLU (if the block had one), as one oneDNN kernel in eager CPU.

    ``block`` is a conv -> BatchNorm -> activation sequence with ``conv``, ``bn`` and ``act`` children
    (:class:`~mobilevit.models.layers.ConvNormAct`, the segmentation head's ``ConvBNReLU``, the detection
    head's ``ConvBN``).
    """

    def __init__(self, block: ConvNormAct | ConvBNReLU | ConvBN):
        super().__init__()
        self.conv = fold_batchnorm(block.conv, block.bn)
        kind = type(block.act)
        self.act = kind() if kind in _ONEDNN_ACTIVATIONS else nn.Identity()
        self.onednn_act = _ONEDNN_ACTIVATIONS.get(kind, "none")

    def forward(self, x: Tensor) -> Tensor:
        if onednn_eager(x):
            c = self.conv
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups, self.onednn_act, [], None
            )
        return self.act(self.conv(x))


def linear_silu(x: Tensor, linear: nn.Linear) -> Tensor:
    """``silu(linear(x))``, in one oneDNN kernel in eager CPU."""
    if onednn_eager(x):
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "swish", [], "")
    return F.silu(linear(x))


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


def _linear(weight: Tensor, bias: Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear.to(weight.device)


class FoldedTransformerLayer(nn.Module):
    """Pre-norm transformer layer with each LayerNorm's affine folded into the Linear layers after it.

    ``norm1``'s scale and shift go into the query, key and value projections (three Linear layers, the
    attention scale ``head_dim ** -0.5`` folded into the query's), ``norm2``'s into ``fc1``; what is left of
    each LayerNorm is the normalisation. Split projections compile to faster attention in OpenVINO than one
    ``qkv`` projection split afterwards (2-7% for the whole model: ``benchmarks/openvino_graph.py``).
    Dropout is a no-op at inference.
    """

    def __init__(self, layer: TransformerLayer):
        super().__init__()
        attn, mlp, d = layer.attn, layer.mlp, layer.attn.proj.in_features
        self.dim, self.num_heads, self.head_dim = d, attn.num_heads, d // attn.num_heads
        self.eps1, self.eps2 = layer.norm1.eps, layer.norm2.eps
        with torch.no_grad():
            w = attn.qkv.weight * layer.norm1.weight
            b = attn.qkv.bias + attn.qkv.weight @ layer.norm1.bias
            scale = self.head_dim**-0.5
            self.q = _linear(w[:d] * scale, b[:d] * scale)
            self.k = _linear(w[d : 2 * d], b[d : 2 * d])
            self.v = _linear(w[2 * d :], b[2 * d :])
            self.fc1 = _linear(mlp.fc1.weight * layer.norm2.weight, mlp.fc1.bias + mlp.fc1.weight @ layer.norm2.bias)
        self.proj, self.fc2 = attn.proj, mlp.fc2

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, (self.dim,), eps=self.eps1)
        y = F.scaled_dot_product_attention(
            self._heads(self.q(y)), self._heads(self.k(y)), self._heads(self.v(y)), scale=1.0
        )
        x = x + self.proj(y.transpose(1, 2).flatten(2))
        return x + self.fc2(linear_silu(F.layer_norm(x, (self.dim,), eps=self.eps2), self.fc1))


def _linear_from_conv1x1(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_ch, in_ch = weight.shape[:2]
    return _linear(weight.reshape(out_ch, in_ch), bias if bias is not None else weight.new_zeros(out_ch))


class TokenMobileViTBlock(nn.Module):
    """MobileViT block working on tokens between one unfold and one fold.

    ``conv_in`` (1x1) and ``conv_out`` (1x1 + folded BN + SiLU) act on every pixel independently, so they
    commute with the unfold/fold permutation: here they are Linear layers on the token tensor, and the
    transformer's final LayerNorm affine is folded into ``conv_out``'s weights.
    """

    def __init__(self, block: MobileViTBlock):
        super().__init__()
        self.patch_size = block.patch_size
        #: Resize to a multiple of the patch size even when the map is one already (an exact identity), so
        #: that no Python decision depends on H and W: exporters can then leave them symbolic. See
        #: :func:`size_agnostic`.
        self.always_resize = False
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
        c, (b, _, h, w) = self.proj_out.out_features, x.shape
        nh, nw = (h + p - 1) // p, (w + p - 1) // p  # ceil, also for symbolic sizes
        resized = self.always_resize or (nh * p, nw * p) != (h, w)
        y = self.conv_local(x)
        if resized:  # the official bilinear resize to a multiple of the patch size
            y = F.interpolate(y, size=(nh * p, nw * p), mode="bilinear", align_corners=False)
        # [B, C, nh, p, nw, p] -> [B, p, p, nh, nw, C]: one copy (a free view of channels_last memory before it)
        # (explicit sizes, no -1: exporters with symbolic H and W then need no divisibility proofs)
        tokens = y.reshape(b, c, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, nh * nw, c)
        tokens = self.transformer(self.proj_in(tokens))
        tokens = F.layer_norm(tokens, (self.proj_in.out_features,), eps=self.norm_eps)
        # SiLU does not commute with the resize, so it waits until after it when there is one
        tokens = self.proj_out(tokens) if resized else linear_silu(tokens, self.proj_out)
        # back to [B, C, H, W] laid out channels_last (one copy)
        y = tokens.reshape(b, p, p, nh, nw, c).permute(0, 3, 1, 4, 2, 5).reshape(b, nh * p, nw * p, c)
        y = y.permute(0, 3, 1, 2)
        if resized:
            y = F.silu(F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False))
        return self.conv_fusion(torch.cat((x, y), dim=1))


class FusedASPP(nn.Module):
    """ASPP with folded BatchNorm; the image-pooling branch is broadcast over the map (bilinear from 1x1 is constant)."""

    def __init__(self, aspp: ASPP):
        super().__init__()
        self.branches = nn.ModuleList(FusedConv(b) for b in aspp.branches)
        self.pool = FusedConv(aspp.pool)
        self.project = FusedConv(aspp.project)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, (ConvNormAct, ConvBNReLU, ConvBN)):
        return FusedConv(module)
    if isinstance(module, ASPP):
        return FusedASPP(module)
    if isinstance(module, InvertedResidual):
        return FusedInvertedResidual(module)
    if isinstance(module, MobileViTBlock):
        return TokenMobileViTBlock(module)
    if isinstance(module, TransformerLayer):
        return FoldedTransformerLayer(module)
    if isinstance(module, (nn.Dropout, nn.Dropout2d)):
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

    def forward_intermediates(self, x: Tensor, out_indices: tuple[int, ...] = (0, 1, 2, 3, 4)) -> list[Tensor]:
        """Outputs of the stages in ``out_indices`` (0..4, strides 2..32), as the training form's."""
        _check_input(x, self.config.in_chans)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats, x = [], self.stem(x)
        for i, stage in enumerate(self.stages[: max(out_indices) + 1]):
            x = stage(x)
            if i in out_indices:
                feats.append(x)
        return feats

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class DeployedDeepLabV3(nn.Module):
    """Inference form of a :class:`~mobilevit.models.deeplabv3.MobileViTDeepLabV3` (see :func:`deploy`).

    Same inputs and outputs: :meth:`forward` gives logits at the input size, :meth:`forward_logits` at
    the output stride.
    """

    def __init__(self, model: MobileViTDeepLabV3, channels_last: bool = True):
        super().__init__()
        self.config: DeepLabV3Config = model.config
        self.weights_meta = dict(model.weights_meta)
        self.channels_last = channels_last
        self.backbone = DeployedMobileViT(model.backbone, channels_last)
        self.aspp = _convert(model.aspp)
        self.classifier = model.classifier

    @property
    def num_classes(self) -> int:
        return self.classifier.out_channels

    def forward_features(self, x: Tensor) -> Tensor:
        """The backbone's last feature map: [B, C5, H/os, W/os]."""
        return self.backbone.forward_features(x)

    def forward_logits(self, x: Tensor) -> Tensor:
        """Class logits at the output stride: [B, num_classes, ceil(H/os), ceil(W/os)]."""
        return self.classifier(self.aspp(self.forward_features(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits at the input size (bilinear, align_corners=False): [B, num_classes, H, W]."""
        _check_input(x, self.config.backbone.in_chans)
        return F.interpolate(self.forward_logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class DeployedSSDLite(nn.Module):
    """Inference form of a :class:`~mobilevit.models.ssdlite.MobileViTSSDLite` detector (see :func:`deploy`).

    Same raw outputs (:meth:`forward_raw`), box decoding, post-processing and eval ``forward``
    (detections in pixels); no training loss.
    """

    def __init__(self, model: MobileViTSSDLite, channels_last: bool = True):
        super().__init__()
        self.config: SSDLiteConfig = model.config
        self.weights_meta = dict(model.weights_meta)
        self.channels_last = channels_last
        self.backbone = DeployedMobileViT(model.backbone, channels_last)
        self.anchor_generator = model.anchor_generator
        self.extra = _convert(model.extra)
        self.heads = _convert(model.heads)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The six levels' feature maps (strides 16, 32, 64, 128, 256 and global)."""
        feats = self.backbone.forward_intermediates(x, (3, 4))
        for layer in self.extra:
            feats.append(layer(feats[-1]))
        return feats

    def forward_raw(self, x: Tensor) -> SSDOutput:
        """Raw outputs in the official order (levels, rows, columns, anchors) and their anchors."""
        feats = self.forward_features(x)
        outs = [head(f) for head, f in zip(self.heads, feats, strict=True)]
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in feats]).to(x.device)
        return SSDOutput(torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1), anchors)

    decode_boxes = MobileViTSSDLite.decode_boxes
    postprocess = MobileViTSSDLite.postprocess

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Detections in pixels of ``images``, as the training form's eval ``forward``."""
        raw = self.forward_raw(images)
        size = (images.shape[-2], images.shape[-1])
        return self.postprocess(raw, image_sizes=[size] * images.shape[0])


#: What :func:`deploy` turns each model class into.
_DEPLOYED: dict[type[nn.Module], type[nn.Module]] = {
    MobileViT: DeployedMobileViT,
    MobileViTDeepLabV3: DeployedDeepLabV3,
    MobileViTSSDLite: DeployedSSDLite,
}


@overload
def deploy(model: MobileViT, channels_last: bool = True) -> DeployedMobileViT: ...
@overload
def deploy(model: MobileViTDeepLabV3, channels_last: bool = True) -> DeployedDeepLabV3: ...
@overload
def deploy(model: MobileViTSSDLite, channels_last: bool = True) -> DeployedSSDLite: ...
@torch.no_grad()
def deploy(
    model: MobileViT | MobileViTDeepLabV3 | MobileViTSSDLite, channels_last: bool = True
) -> DeployedMobileViT | DeployedDeepLabV3 | DeployedSSDLite:
    """Inference form of ``model`` (a new module in eval mode; ``model`` is left untouched).

    ``model`` is a :class:`~mobilevit.MobileViT` classifier, a
    :class:`~mobilevit.models.deeplabv3.MobileViTDeepLabV3` segmentation model or a
    :class:`~mobilevit.models.ssdlite.MobileViTSSDLite` detector. Outputs (a detector's raw outputs)
    equal the original's within 1e-4 in fp32. With ``channels_last`` (the default) weights and
    activations use that memory format; inputs in either format are accepted.
    """
    kind = next((d for cls, d in _DEPLOYED.items() if isinstance(model, cls)), None)
    if kind is None:
        raise TypeError(
            "deploy() expects a mobilevit.MobileViT or MobileViTDeepLabV3 or MobileViTSSDLite, "
            f"got {type(model).__name__}"
        )
    fast = kind(copy.deepcopy(model).eval(), channels_last)
    if channels_last:
        fast.to(memory_format=torch.channels_last)
    return fast.eval().requires_grad_(False)


def size_agnostic(model: nn.Module) -> nn.Module:
    """Make the MobileViT blocks of an inference form take every input size with the same operations (in place).

    Each block then always resizes its map to a multiple of its patch size (an exact identity when it
    is one already), instead of deciding from H and W in Python. Exporters need this to leave H and W
    symbolic; eager inference is faster without it. Returns ``model``.
    """
    for module in model.modules():
        if isinstance(module, TokenMobileViTBlock):
            module.always_resize = True
    return model
