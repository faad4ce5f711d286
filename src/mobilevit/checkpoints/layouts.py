"""State-dict layouts of the MobileViT v1 ports and the renaming between them and ours.

Every layout names the same modules; a layout is a table from our module-name templates to its
own. Templates use ``{i}``/``{j}`` (MobileNetV2 stage and block, stages 0-1), ``{m}`` (MobileViT
stage 2-4), ``{t}`` (transformer layer), ``{L}`` (layers in that stage), ``{s}`` (1-based stage)
``{b}`` (ASPP branch), ``{e}`` / ``{os}`` (SSD extra layer and its output stride), ``{h}`` (SSD level with a
separable predictor) and ``{p}`` (SSD level with a projection).

A task other than classification (see :data:`TASKS`) is the classification backbone without its
final 1x1 conv and classifier, under a prefix, plus a head with a small table of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Our module names, with the index scope each template is expanded over.
_MV2 = ("expand", "dw", "project")
_OURS: list[tuple[str, str]] = [
    ("stem.conv", ""), ("stem.bn", ""),
    *[(f"stages.{{i}}.{{j}}.{p}.{q}", "mv2") for p in _MV2 for q in ("conv", "bn")],
    *[(f"stages.{{m}}.0.{p}.{q}", "vit") for p in _MV2 for q in ("conv", "bn")],
    ("stages.{m}.1.conv_local.conv", "vit"), ("stages.{m}.1.conv_local.bn", "vit"),
    ("stages.{m}.1.conv_in", "vit"),
    *[(f"stages.{{m}}.1.transformer.{{t}}.{p}", "layer")
      for p in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")],
    ("stages.{m}.1.norm", "vit"),
    ("stages.{m}.1.conv_out.conv", "vit"), ("stages.{m}.1.conv_out.bn", "vit"),
    ("stages.{m}.1.conv_fusion.conv", "vit"), ("stages.{m}.1.conv_fusion.bn", "vit"),
    ("final_conv.conv", ""), ("final_conv.bn", ""),
    ("fc", ""),
]  # fmt: skip


def _table(rename: dict[str, str]) -> dict[str, str]:
    """Expand a short table of name fragments into a full template table."""
    out = {}
    for ours, _ in _OURS:
        theirs = ours
        for a, b in rename.items():
            theirs = theirs.replace(a, b)
        out[ours] = theirs
    return out


_CVNETS = {
    "stem.conv": "conv_1.block.conv", "stem.bn": "conv_1.block.norm",
    **{f"stages.{{i}}.{{j}}.{p}.{q}": f"layer_{{s}}.{{j}}.block.{c}.block.{n}"
       for p, c in zip(_MV2, ("exp_1x1", "conv_3x3", "red_1x1"), strict=True) for q, n in (("conv", "conv"), ("bn", "norm"))},
    **{f"stages.{{m}}.0.{p}.{q}": f"layer_{{s}}.0.block.{c}.block.{n}"
       for p, c in zip(_MV2, ("exp_1x1", "conv_3x3", "red_1x1"), strict=True) for q, n in (("conv", "conv"), ("bn", "norm"))},
    "stages.{m}.1.conv_local.conv": "layer_{s}.1.local_rep.conv_3x3.block.conv",
    "stages.{m}.1.conv_local.bn": "layer_{s}.1.local_rep.conv_3x3.block.norm",
    "stages.{m}.1.conv_in": "layer_{s}.1.local_rep.conv_1x1.block.conv",
    "stages.{m}.1.transformer.{t}.norm1": "layer_{s}.1.global_rep.{t}.pre_norm_mha.0",
    "stages.{m}.1.transformer.{t}.attn.qkv": "layer_{s}.1.global_rep.{t}.pre_norm_mha.1.qkv_proj",
    "stages.{m}.1.transformer.{t}.attn.proj": "layer_{s}.1.global_rep.{t}.pre_norm_mha.1.out_proj",
    "stages.{m}.1.transformer.{t}.norm2": "layer_{s}.1.global_rep.{t}.pre_norm_ffn.0",
    "stages.{m}.1.transformer.{t}.mlp.fc1": "layer_{s}.1.global_rep.{t}.pre_norm_ffn.1",
    "stages.{m}.1.transformer.{t}.mlp.fc2": "layer_{s}.1.global_rep.{t}.pre_norm_ffn.4",
    "stages.{m}.1.norm": "layer_{s}.1.global_rep.{L}",
    "stages.{m}.1.conv_out.conv": "layer_{s}.1.conv_proj.block.conv",
    "stages.{m}.1.conv_out.bn": "layer_{s}.1.conv_proj.block.norm",
    "stages.{m}.1.conv_fusion.conv": "layer_{s}.1.fusion.block.conv",
    "stages.{m}.1.conv_fusion.bn": "layer_{s}.1.fusion.block.norm",
    "final_conv.conv": "conv_1x1_exp.block.conv", "final_conv.bn": "conv_1x1_exp.block.norm",
    "fc": "classifier.fc",
}  # fmt: skip

_HF_MV2 = {"expand": "expand_1x1", "dw": "conv_3x3", "project": "reduce_1x1"}
_HF = {
    "stem.conv": "mobilevit.conv_stem.convolution", "stem.bn": "mobilevit.conv_stem.normalization",
    **{f"stages.{{i}}.{{j}}.{p}.{q}": f"mobilevit.encoder.layer.{{i}}.layer.{{j}}.{_HF_MV2[p]}.{n}"
       for p in _MV2 for q, n in (("conv", "convolution"), ("bn", "normalization"))},
    **{f"stages.{{m}}.0.{p}.{q}": f"mobilevit.encoder.layer.{{m}}.downsampling_layer.{_HF_MV2[p]}.{n}"
       for p in _MV2 for q, n in (("conv", "convolution"), ("bn", "normalization"))},
    "stages.{m}.1.conv_local.conv": "mobilevit.encoder.layer.{m}.conv_kxk.convolution",
    "stages.{m}.1.conv_local.bn": "mobilevit.encoder.layer.{m}.conv_kxk.normalization",
    "stages.{m}.1.conv_in": "mobilevit.encoder.layer.{m}.conv_1x1.convolution",
    "stages.{m}.1.transformer.{t}.norm1": "mobilevit.encoder.layer.{m}.transformer.layer.{t}.layernorm_before",
    # one qkv Linear <-> three: the "|" marks a split along the output rows, in q | k | v order
    "stages.{m}.1.transformer.{t}.attn.qkv": "|".join(
        f"mobilevit.encoder.layer.{{m}}.transformer.layer.{{t}}.attention.attention.{n}" for n in ("query", "key", "value")
    ),
    "stages.{m}.1.transformer.{t}.attn.proj": "mobilevit.encoder.layer.{m}.transformer.layer.{t}.attention.output.dense",
    "stages.{m}.1.transformer.{t}.norm2": "mobilevit.encoder.layer.{m}.transformer.layer.{t}.layernorm_after",
    "stages.{m}.1.transformer.{t}.mlp.fc1": "mobilevit.encoder.layer.{m}.transformer.layer.{t}.intermediate.dense",
    "stages.{m}.1.transformer.{t}.mlp.fc2": "mobilevit.encoder.layer.{m}.transformer.layer.{t}.output.dense",
    "stages.{m}.1.norm": "mobilevit.encoder.layer.{m}.layernorm",
    "stages.{m}.1.conv_out.conv": "mobilevit.encoder.layer.{m}.conv_projection.convolution",
    "stages.{m}.1.conv_out.bn": "mobilevit.encoder.layer.{m}.conv_projection.normalization",
    "stages.{m}.1.conv_fusion.conv": "mobilevit.encoder.layer.{m}.fusion.convolution",
    "stages.{m}.1.conv_fusion.bn": "mobilevit.encoder.layer.{m}.fusion.normalization",
    "final_conv.conv": "mobilevit.conv_1x1_exp.convolution", "final_conv.bn": "mobilevit.conv_1x1_exp.normalization",
    "fc": "classifier",
}  # fmt: skip

_MM_MV2 = {"expand": "conv.0", "dw": "conv.1", "project": "conv.2"}
_MMPRETRAIN = {
    "stem.conv": "backbone.stem.conv", "stem.bn": "backbone.stem.bn",
    **{f"stages.{{i}}.{{j}}.{p}.{q}": f"backbone.layers.{{i}}.{{j}}.{_MM_MV2[p]}.{q}" for p in _MV2 for q in ("conv", "bn")},
    **{f"stages.{{m}}.0.{p}.{q}": f"backbone.layers.{{m}}.0.{_MM_MV2[p]}.{q}" for p in _MV2 for q in ("conv", "bn")},
    "stages.{m}.1.conv_local.conv": "backbone.layers.{m}.1.local_rep.0.conv",
    "stages.{m}.1.conv_local.bn": "backbone.layers.{m}.1.local_rep.0.bn",
    "stages.{m}.1.conv_in": "backbone.layers.{m}.1.local_rep.1.conv",
    "stages.{m}.1.transformer.{t}.norm1": "backbone.layers.{m}.1.global_rep.{t}.ln1",
    "stages.{m}.1.transformer.{t}.attn.qkv": "backbone.layers.{m}.1.global_rep.{t}.attn.qkv",
    "stages.{m}.1.transformer.{t}.attn.proj": "backbone.layers.{m}.1.global_rep.{t}.attn.proj",
    "stages.{m}.1.transformer.{t}.norm2": "backbone.layers.{m}.1.global_rep.{t}.ln2",
    "stages.{m}.1.transformer.{t}.mlp.fc1": "backbone.layers.{m}.1.global_rep.{t}.ffn.layers.0.0",
    "stages.{m}.1.transformer.{t}.mlp.fc2": "backbone.layers.{m}.1.global_rep.{t}.ffn.layers.1",
    "stages.{m}.1.norm": "backbone.layers.{m}.1.global_rep.{L}",
    "stages.{m}.1.conv_out.conv": "backbone.layers.{m}.1.conv_proj.conv",
    "stages.{m}.1.conv_out.bn": "backbone.layers.{m}.1.conv_proj.bn",
    "stages.{m}.1.conv_fusion.conv": "backbone.layers.{m}.1.conv_fusion.conv",
    "stages.{m}.1.conv_fusion.bn": "backbone.layers.{m}.1.conv_fusion.bn",
    "final_conv.conv": "backbone.conv_1x1_exp.conv", "final_conv.bn": "backbone.conv_1x1_exp.bn",
    "fc": "head.fc",
}  # fmt: skip

_TIMM = _table(
    {".expand.": ".conv1_1x1.", ".dw.": ".conv2_kxk.", ".project.": ".conv3_1x1.", "conv_local": "conv_kxk",
     "conv_in": "conv_1x1", "conv_out": "conv_proj"}
) | {"fc": "head.fc"}  # fmt: skip

#: Module-name tables of every layout we read and write. ``mobilevit`` is our own.
LAYOUTS: dict[str, dict[str, str]] = {
    "mobilevit": _table({}),
    "timm": _TIMM,
    "cvnets": _CVNETS,
    "hf": _HF,
    "mmpretrain": _MMPRETRAIN,
}
#: Channel order the published weights of each layout expect (ours and timm's are RGB).
CHANNEL_ORDER = {"mobilevit": "RGB", "timm": "RGB", "cvnets": "BGR", "hf": "BGR", "mmpretrain": "BGR"}

# DeepLabv3 head (ASPP: 1x1 branch, three dilated 3x3 branches, image pooling; then the classifier).
_SEG_HEAD = [
    ("aspp.branches.{b}.conv", "aspp"), ("aspp.branches.{b}.bn", "aspp"), ("aspp.pool.conv", ""),
    ("aspp.pool.bn", ""), ("aspp.project.conv", ""), ("aspp.project.bn", ""), ("classifier", ""),
]  # fmt: skip
_CVNETS_ASPP = "seg_head.aspp.aspp_layer"
_HF_ASPP = "segmentation_head.aspp"
_SEG_HEADS = {
    "cvnets": {
        "aspp.branches.{b}.conv": f"{_CVNETS_ASPP}.convs.{{b}}.block.conv",
        "aspp.branches.{b}.bn": f"{_CVNETS_ASPP}.convs.{{b}}.block.norm",
        "aspp.pool.conv": f"{_CVNETS_ASPP}.convs.4.aspp_pool.conv_1x1.block.conv",
        "aspp.pool.bn": f"{_CVNETS_ASPP}.convs.4.aspp_pool.conv_1x1.block.norm",
        "aspp.project.conv": f"{_CVNETS_ASPP}.project.block.conv",
        "aspp.project.bn": f"{_CVNETS_ASPP}.project.block.norm",
        "classifier": "seg_head.classifier.classifier.block.conv",
    },
    "hf": {
        "aspp.branches.{b}.conv": f"{_HF_ASPP}.convs.{{b}}.convolution",
        "aspp.branches.{b}.bn": f"{_HF_ASPP}.convs.{{b}}.normalization",
        "aspp.pool.conv": f"{_HF_ASPP}.convs.4.conv_1x1.convolution",
        "aspp.pool.bn": f"{_HF_ASPP}.convs.4.conv_1x1.normalization",
        "aspp.project.conv": f"{_HF_ASPP}.project.convolution",
        "aspp.project.bn": f"{_HF_ASPP}.project.normalization",
        "classifier": "segmentation_head.classifier.convolution",
    },
}

# SSDLite head: extra layers (separable, stride 2, then a global level) and one predictor per level.
_DET_HEAD = [
    ("extra.{e}.dw.conv", "extra"), ("extra.{e}.dw.bn", "extra"), ("extra.{e}.pw.conv", "extra"),
    ("extra.{e}.pw.bn", "extra"), ("extra.3.conv", ""),
    ("heads.{p}.proj.conv", "proj"), ("heads.{p}.proj.bn", "proj"),
    ("heads.{h}.pred.dw.conv", "heads"), ("heads.{h}.pred.dw.bn", "heads"), ("heads.{h}.pred.pw", "heads"),
    ("heads.5.pred", ""),
]  # fmt: skip
_DET_HEADS = {
    "cvnets": {
        "extra.{e}.dw.conv": "extra_layers.os_{os}.dw_conv.block.conv",
        "extra.{e}.dw.bn": "extra_layers.os_{os}.dw_conv.block.norm",
        "extra.{e}.pw.conv": "extra_layers.os_{os}.pw_conv.block.conv",
        "extra.{e}.pw.bn": "extra_layers.os_{os}.pw_conv.block.norm",
        "extra.3.conv": "extra_layers.os_-1.1.block.conv",
        "heads.{p}.proj.conv": "ssd_heads.{p}.proj_layer.block.conv",
        "heads.{p}.proj.bn": "ssd_heads.{p}.proj_layer.block.norm",
        "heads.{h}.pred.dw.conv": "ssd_heads.{h}.loc_cls_layer.dw_conv.block.conv",
        "heads.{h}.pred.dw.bn": "ssd_heads.{h}.loc_cls_layer.dw_conv.block.norm",
        "heads.{h}.pred.pw": "ssd_heads.{h}.loc_cls_layer.pw_conv.block.conv",
        "heads.5.pred": "ssd_heads.5.loc_cls_layer.block.conv",
    },
}


@dataclass(frozen=True)
class Task:
    """How one task's state dict is named: the backbone under a prefix, then the task's head.

    ``prefixes`` gives, per layout that can hold the task, the backbone's prefix in that layout
    (``mobilevit`` is ours); ``heads`` the head's table per layout (ours is the identity).
    ``dropped`` are backbone modules the task does not have; ``classifier`` the modules replaced
    when the number of classes changes.
    """

    prefixes: dict[str, str]
    head: list[tuple[str, str]]
    heads: dict[str, dict[str, str]]
    dropped: tuple[str, ...]
    classifier: tuple[str, ...]

    @property
    def prefix(self) -> str:
        """Our prefix of the backbone's keys."""
        return self.prefixes["mobilevit"]


#: Every task's naming.
TASKS: dict[str, Task] = {
    "classification": Task({name: "" for name in LAYOUTS}, [], {name: {} for name in LAYOUTS}, (), ("fc",)),
    "segmentation": Task(
        prefixes={"mobilevit": "backbone.", "cvnets": "encoder.", "hf": ""},
        head=_SEG_HEAD,
        heads={"mobilevit": {ours: ours for ours, _ in _SEG_HEAD}, **_SEG_HEADS},
        dropped=("final_conv", "fc"),
        classifier=("classifier",),
    ),
    "detection": Task(
        prefixes={"mobilevit": "backbone.", "cvnets": "encoder."},
        head=_DET_HEAD,
        heads={"mobilevit": {ours: ours for ours, _ in _DET_HEAD}, **_DET_HEADS},
        dropped=("final_conv", "fc"),
        classifier=(
            "heads.0.pred.pw",
            "heads.1.pred.pw",
            "heads.2.pred.pw",
            "heads.3.pred.pw",
            "heads.4.pred.pw",
            "heads.5.pred",
        ),
    ),
}

_PARAM_SUFFIXES = {
    "conv": ("weight",),
    "bn": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
    "linear": ("weight", "bias"),
}
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def _kind(ours: str) -> str:
    if ours.endswith(".bn"):
        return "bn"
    if ours.endswith((".conv", "conv_in")):
        return "conv"
    return "linear"  # Linear, LayerNorm and a conv with bias all hold weight + bias


def _expand(
    templates: list[tuple[str, str]], table: dict[str, str], depths: Sequence[int]
) -> Iterator[tuple[str, str]]:
    """``(ours, theirs)`` module names of ``templates`` expanded over their index scope."""
    for ours, scope in templates:
        if scope == "mv2":
            idx = [dict(i=i, j=j, s=i + 1) for i, j in ((0, 0), (1, 0), (1, 1), (1, 2))]
        elif scope == "vit":
            idx = [dict(m=m, s=m + 1, L=depths[m - 2]) for m in (2, 3, 4)]
        elif scope == "layer":
            idx = [dict(m=m, s=m + 1, t=t) for m in (2, 3, 4) for t in range(depths[m - 2])]
        elif scope == "aspp":
            idx = [dict(b=b) for b in range(4)]
        elif scope == "extra":
            idx = [dict(e=e, os=64 * 2**e) for e in range(3)]
        elif scope == "heads":
            idx = [dict(h=h) for h in range(5)]
        elif scope == "proj":
            idx = [dict(p=p) for p in range(2)]
        else:
            idx = [{}]
        for kw in idx:
            yield ours.format(**kw), table[ours].format(**kw)


def module_pairs(
    layout: str, depths: Sequence[int] = (2, 4, 3), task: str = "classification"
) -> Iterator[tuple[str, str, str]]:
    """Yield ``(our_module, their_module, kind)`` for every parameterised module, in model order."""
    spec = TASKS[task]
    if layout not in spec.prefixes:
        raise ValueError(f"the {layout} layout has no {task} models; those are in {', '.join(spec.prefixes)}")
    theirs_prefix = spec.prefixes[layout]
    backbone = [(ours, scope) for ours, scope in _OURS if ours.split(".")[0] not in spec.dropped]
    for ours, theirs in _expand(backbone, LAYOUTS[layout], depths):
        yield spec.prefix + ours, "|".join(theirs_prefix + t for t in theirs.split("|")), _kind(ours)
    for ours, theirs in _expand(spec.head, spec.heads[layout], depths):
        yield ours, theirs, _kind(ours)


def _expand_keys(module: str, kind: str) -> list[str]:
    return [f"{module}.{s}" for s in _PARAM_SUFFIXES[kind]]


def expected_keys(layout: str, depths: Sequence[int] = (2, 4, 3), task: str = "classification") -> list[str]:
    """All state-dict keys of a ``task`` model in ``layout`` (split qkv modules listed separately)."""
    return [
        k
        for _, theirs, kind in module_pairs(layout, depths, task)
        for m in theirs.split("|")
        for k in _expand_keys(m, kind)
    ]


def to_ours(
    state: dict[str, Tensor], layout: str, depths: Sequence[int] = (2, 4, 3), task: str = "classification"
) -> dict[str, Tensor]:
    """Rename a ``layout`` state dict to our names. Missing keys are left out (the caller checks)."""
    out: dict[str, Tensor] = {}
    for ours, theirs, kind in module_pairs(layout, depths, task):
        for suffix in _PARAM_SUFFIXES[kind]:
            parts = [f"{m}.{suffix}" for m in theirs.split("|")]
            if all(p in state for p in parts):
                out[f"{ours}.{suffix}"] = state[parts[0]] if len(parts) == 1 else torch.cat([state[p] for p in parts])
    return out


def from_ours(
    state: dict[str, Tensor], layout: str, depths: Sequence[int] = (2, 4, 3), task: str = "classification"
) -> dict[str, Tensor]:
    """Rename our state dict to ``layout``'s names (the inverse of :func:`to_ours`), keeping its order."""
    names = {ours: theirs for ours, theirs, _ in module_pairs(layout, depths, task)}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        module, suffix = key.rsplit(".", 1)
        parts = names[module].split("|")
        for m, chunk in zip(parts, value.chunk(len(parts)) if len(parts) > 1 else [value], strict=True):
            out[f"{m}.{suffix}"] = chunk.contiguous()
    return out


def flip_stem_channels(state: dict[str, Tensor], task: str = "classification") -> dict[str, Tensor]:
    """Reverse the input channels of the stem conv (our names): RGB <-> BGR."""
    key = TASKS[task].prefix + "stem.conv.weight"
    out = dict(state)
    out[key] = state[key].flip(1).contiguous()
    return out
