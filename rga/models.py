"""ResNet + RGA re-id models (paper Section 4.1) and the flat factory ``build_model``.

ResNet-50 (or ResNet-18 for quick CPU runs) with the last stride set to 1, an RGA module after
each of the four stages, global average pooling, a BN neck with a frozen bias and a bias-free
classifier. Module names follow the public implementation (``backbone.layer1``,
``backbone.rga_att1``, ``feat_bn``, ``cls``) and the backbone's names follow torchvision, so
``model.backbone`` loads a torchvision ResNet state dict (its ``fc`` is ignored).
"""
from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .attention import DESIGNS
from .errors import CheckpointError
from .fileio import extract_model_state, load_torch, resolve_checkpoint
from .registry import DESIGN_LABELS, INIT_OPTIONS, PAPER_LABELS, RGA_OPTIONS, VARIANT_ALIASES, VARIANTS
from .registry import BACKBONES as BACKBONE_NAMES
from .modules import RGAModule

# The names (VARIANTS: design -> options, the RGA defaults, the paper's labels) are rga.registry's;
# this module maps them to classes. To add another design (CBAM, SE, non-local, ...): add its class
# to ATTENTIONS (a module class(in_channels, spatial_size, **options) that keeps the shape of a
# (B, C, H, W) map) and a row to rga.registry.VARIANTS, e.g. "cbam_s": dict(attention="cbam",
# use_channel=False). It is then a model for build_model, ResNetRGA, `--model` of rga.train and
# the checkpoints' config.
# attention name -> module class(in_channels, spatial_size, **options). The Table 2 designs
# (rga/attention.py) are placed where RGA is placed; they take no RGA options; `fused` touches only RGA.
ATTENTIONS = {"rga": RGAModule, **{name: cls for name, (cls, _label) in DESIGNS.items()}}
ATTENTION_VARIANTS = DESIGN_LABELS  # the Table 2 designs: name -> the paper's label
ALIASES = VARIANT_ALIASES
NECK_FEATS = ("bn", "pool")
STAGES = (1, 2, 3, 4)  # the ResNet stages that can get an attention module (the paper: all four)


# ----------------------------------------------------------------------------------------------
# ResNet blocks with torchvision's parameter names (v1.5: the stride sits on the 3x3 conv)
# ----------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


BACKBONES = {"resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet18": (BasicBlock, (2, 2, 2, 2))}
assert tuple(BACKBONES) == BACKBONE_NAMES
ARCHS = BACKBONES  # the former name of BACKBONES, kept for existing imports


def stage_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Feature-map sizes after the four stages (stride 4, 8, 16, 16 with last stride 1).

    Every stride-2 op here (7x7/pad 3 conv, 3x3/pad 1 max pool and conv, 1x1 downsample) maps
    s to ceil(s / 2).
    """
    def half(s):
        return (s + 1) // 2

    h, w = half(half(height)), half(half(width))
    sizes = [(h, w)]
    for _ in range(2):
        h, w = half(h), half(w)
        sizes.append((h, w))
    sizes.append((h, w))
    return sizes


class RGABackbone(nn.Module):
    """Torchvision-named ResNet trunk (no fc) with last stride 1 and ``rga_att{1..4}`` after the stages.

    ``make_attention(channels, spatial_size)`` builds the module placed after each stage in
    ``stages``; the other stages get ``nn.Identity`` (no parameters). None: no modules at all.
    """

    def __init__(self, arch: str, spatial_sizes, make_attention=None, stages=STAGES):
        super().__init__()
        block, layers = BACKBONES[arch]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 1)  # last stride 1
        for m in self.modules():  # torchvision's init (the RGA modules below keep PyTorch defaults)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.out_channels = 512 * block.expansion
        for i, (planes, size) in enumerate(zip((64, 128, 256, 512), spatial_sizes), start=1):
            use = make_attention is not None and i in stages
            att = make_attention(planes * block.expansion, size) if use else nn.Identity()
            setattr(self, f"rga_att{i}", att)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.rga_att1(self.layer1(x))
        x = self.rga_att2(self.layer2(x))
        x = self.rga_att3(self.layer3(x))
        return self.rga_att4(self.layer4(x))


class ResNetRGA(nn.Module):
    """ResNet(-50) + RGA re-id network.

    train mode: returns (pooled feature, BN-neck feature, logits).
    eval mode: returns one tensor, the BN-neck feature (``neck_feat == "bn"``) or the pooled
    feature (``"pool"``); ``neck_feat`` can be changed after construction.
    """

    def __init__(self, num_classes: int, variant: str = "rga_sc", *, arch: str = "resnet50", height: int = 256,
                 width: int = 128, fused: bool | str = False, neck_feat: str = "bn", stages=STAGES,
                 **rga_options):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        variant = ALIASES.get(variant, variant)
        if variant not in VARIANTS:
            raise ValueError(f"unknown model {variant!r}; choose one of {sorted(VARIANTS)}")
        if arch not in BACKBONES:
            raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(BACKBONES)}")
        stages = tuple(sorted(set(stages))) if isinstance(stages, (tuple, list, set)) else stages
        if not isinstance(stages, tuple) or not stages or any(s not in STAGES for s in stages):
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {stages!r}")
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 16:
                raise ValueError(f"{name} must be an int >= 16, got {value!r}")
        unknown = set(rga_options) - set(RGA_OPTIONS)
        if unknown:
            raise TypeError(f"unknown RGA option(s) {sorted(unknown)}; valid: {sorted(RGA_OPTIONS)}")
        spec = VARIANTS[variant]
        if spec is None or spec.get("attention", "rga") != "rga":
            for name in INIT_OPTIONS:  # no RGA gates to initialise
                rga_options.pop(name, None)
        if spec is None:
            # `fused` is accepted (the same model either way); options that change RGA modules are not
            changed = {k: v for k, v in rga_options.items() if v != RGA_OPTIONS[k]}
            if changed:
                raise ValueError(f"the baseline has no RGA modules, so {changed} has no effect")
            if stages != STAGES:
                raise ValueError(f"the baseline has no attention modules, so stages={stages} has no effect")
            make_attention = None
        else:
            spec = dict(spec)
            attention = ATTENTIONS[spec.pop("attention", "rga")]
            if attention is RGAModule:
                spec = dict(RGA_OPTIONS, **rga_options, **spec, fused=fused)
            elif rga_options:
                raise ValueError(f"{variant} has no RGA modules, so {rga_options} has no effect")

            def make_attention(channels, size):
                return attention(channels, size, **spec)

        self.variant, self.arch, self.stages = variant, arch, stages
        self.height, self.width = height, width
        self.num_classes = num_classes
        self.spatial_sizes = stage_sizes(height, width)
        self.backbone = RGABackbone(arch, self.spatial_sizes, make_attention, stages)
        self.feature_dim = self.backbone.out_channels
        self.feat_bn = nn.BatchNorm1d(self.feature_dim)
        self.feat_bn.bias.requires_grad_(False)  # BN neck with a frozen (zero) bias
        self.cls = nn.Linear(self.feature_dim, num_classes, bias=False)
        nn.init.normal_(self.cls.weight, std=0.001)
        self.neck_feat = neck_feat
        hint = f"; the model was built for {height}x{width} images"
        for m in self.attention_modules():
            m._size_hint = hint

    @property
    def neck_feat(self) -> str:
        return self._neck_feat

    @neck_feat.setter
    def neck_feat(self, value: str) -> None:
        if value not in NECK_FEATS:
            raise ValueError(f"neck_feat must be one of {NECK_FEATS}, got {value!r}")
        self._neck_feat = value

    def rga_modules(self) -> list[RGAModule]:
        return [m for m in self.backbone.modules() if isinstance(m, RGAModule)]

    def attention_modules(self) -> list[nn.Module]:
        """The attention module after each stage (``backbone.rga_att1..4``) that is not an identity:
        RGA modules or a Table 2 design."""
        mods = [getattr(self.backbone, f"rga_att{i}") for i in range(1, 5)]
        return [m for m in mods if not isinstance(m, nn.Identity)]

    @property
    def fused(self) -> bool | str:
        mods = self.rga_modules()
        return mods[0].fused if mods else False

    @fused.setter
    def fused(self, value: bool | str) -> None:
        for m in self.rga_modules():
            m.fused = value

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, arch={self.arch!r}, input={self.height}x{self.width}, "
                f"stages={self.stages}, neck_feat={self.neck_feat!r}")

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected an image tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if self.variant != "baseline" and tuple(x.shape[2:]) != (self.height, self.width):
            h, w = x.shape[2:]
            fh, fw = self.spatial_sizes[0]
            raise ValueError(
                f"this {self.variant} model was built for {self.height}x{self.width} images (RGA modules "
                f"for {fh}x{fw} feature maps at stage 1) but got {h}x{w} images; build the model with "
                f"height={h}, width={w} for this input size"
            )

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        feat = self.backbone(x)
        pooled = feat.mean((2, 3))  # = global average pooling; has a deterministic CUDA backward
        bn_feat = self.feat_bn(pooled)
        if not self.training:
            return bn_feat if self._neck_feat == "bn" else pooled
        return pooled, bn_feat, self.cls(bn_feat)


ResNet50RGA = ResNetRGA  # the paper's model is ResNetRGA(num_classes, "rga_sc", arch="resnet50")


# ----------------------------------------------------------------------------------------------
# ImageNet weights from a local torchvision checkpoint
# ----------------------------------------------------------------------------------------------

def find_imagenet_weights(arch: str) -> str | None:
    """The one weight finder: a torchvision ``{arch}-*.pth`` in ``./pretrained``, else in the torch hub
    cache (``torch.hub.get_dir()/checkpoints``); None when neither holds one. ``--pretrained auto``
    and ``pretrained=True`` both look here."""
    for folder in ("pretrained", os.path.join(torch.hub.get_dir(), "checkpoints")):
        found = sorted(glob.glob(os.path.join(folder, f"{arch}-*.pth")))
        if found:
            return found[0]
    return None


#: torchvision ResNets by their trunk: blocks per stage and whether the blocks are bottlenecks
RESNET_TRUNKS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                 ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
                 ((3, 8, 36, 3), True): "resnet152"}


def resnet_trunk(state: dict) -> str | None:
    """The torchvision ResNet whose trunk a state dict holds (``resnet18`` ... ``resnet152``), or None."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4))
    return RESNET_TRUNKS.get((blocks, any(k.endswith(".conv3.weight") for k in state)))


def load_imagenet_weights(backbone: RGABackbone, source, arch: str = "resnet50") -> str:
    """Load a torchvision ResNet state dict (path, mapping, or True for the torch hub cache) into ``backbone``.

    ``source`` may also be a checkpoint or run folder of ``rga.train`` (the paper's protocol at small
    scale: a model trained here stands in for ImageNet): its ResNet trunk is loaded, its neck,
    classifier and attention modules are not. The torchvision ``fc.*`` entries are ignored; every
    trunk parameter must be present.
    Returns a description of the source.
    """
    if source is True:
        source = find_imagenet_weights(arch)
        if source is None:
            raise FileNotFoundError(
                f"pretrained=True: no {arch}-*.pth in ./pretrained or {os.path.join(torch.hub.get_dir(), 'checkpoints')}; "
                f"pass pretrained='path/to/{arch}-....pth' (a torchvision ImageNet state dict) or pretrained=False "
                "for random init")
    if isinstance(source, (str, os.PathLike)):
        desc = os.fspath(source)
        if os.path.isdir(desc):  # a run folder of rga.train: its newest checkpoint
            desc = os.fspath(resolve_checkpoint(desc))
        if not os.path.isfile(desc):
            raise FileNotFoundError(f"pretrained checkpoint not found: {desc}")
        state = load_torch(desc)  # the safe loader, with its clear errors
    elif isinstance(source, Mapping):
        desc, state = "<state dict>", source
    else:
        raise TypeError(f"pretrained must be a path, a state dict, True, False or None; got {type(source).__name__}")
    try:
        state = extract_model_state(dict(state))  # ours, a public script's or torchvision's; wrappers stripped
    except CheckpointError as e:
        raise ValueError(f"{desc} is not a torchvision {arch} state dict: {e}") from None
    if any(k.startswith("backbone.") for k in state):
        # a model of this package (rga.train checkpoint or run folder): its trunk only; the neck,
        # the classifier and any attention modules are left out, so new attention starts fresh
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "rga_att"))}
    found = resnet_trunk(state)
    if found is not None and found != arch:
        raise ValueError(f"{desc} is not a torchvision {arch} state dict: it holds a {found} trunk; give "
                         f"--backbone {found}, or weights of a {arch}")
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch, e.g. a resnet18 file for a resnet50 model
        raise ValueError(f"{desc} is not a torchvision {arch} state dict: {err}") from None
    missing = [k for k in missing if not k.startswith("rga_att")]
    if missing or unexpected:
        raise ValueError(
            f"{desc} is not a torchvision {arch} state dict: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return desc


def build_model(name: str, num_classes: int, *, height: int = 256, width: int = 128, fused: bool | str = False,
                pretrained=None, backbone: str = "resnet50", neck_feat: str = "bn", stages=STAGES,
                **rga_options) -> ResNetRGA:
    """Build a re-id model by name: baseline, rga_s, rga_c, rga_sc, rga_cs, rga_s_par_c.

    ``pretrained``: path to a local torchvision ResNet checkpoint (or a state dict, or True to use
    the torch hub cache); None: random init with a warning; False: random init, no warning.
    ``stages``: the stages (a subset of 1..4) followed by an attention module; the paper: all four.
    ``rga_options``: use_relation, use_original, embedding, cha_ratio, spa_ratio, down_ratio.
    """
    model = ResNetRGA(num_classes, name, arch=backbone, height=height, width=width, fused=fused,
                      neck_feat=neck_feat, stages=stages, **rga_options)
    if pretrained is None:
        warnings.warn(
            f"build_model({name!r}): no ImageNet weights given, the {backbone} backbone is randomly initialised; "
            f"pass pretrained='path/to/{backbone}-....pth' (a torchvision checkpoint) to start from ImageNet, "
            "or pretrained=False to silence this warning",
            UserWarning, stacklevel=2,
        )
    elif pretrained is not False:
        load_imagenet_weights(model.backbone, pretrained, backbone)
    return model


def build_from_config(model_cfg, num_classes: int, *, pretrained=False, neck_feat: str = "bn", fused=None):
    """The network a ``rga.config.ModelConfig`` describes (random init unless `pretrained` says
    otherwise); ``fused`` overrides the config's RGA path."""
    return build_model(model_cfg.variant, int(num_classes), height=model_cfg.height, width=model_cfg.width,
                       backbone=model_cfg.backbone, stages=tuple(model_cfg.stages), pretrained=pretrained,
                       fused=model_cfg.fused if fused is None else fused, neck_feat=neck_feat,
                       **{k: getattr(model_cfg, k) for k, v in RGA_OPTIONS.items() if getattr(model_cfg, k) != v})


# ----------------------------------------------------------------------------------------------
# python -m rga.models --params: parameter counts against the paper's Table 3
# ----------------------------------------------------------------------------------------------

# The paper's Table 3 (millions, ResNet-50, 751 classes). Our copy of the paper lost the NL, SE
# and RGA-C cells (the header names them, the row has no value), so they are absent here.
PAPER_TABLE3 = {"baseline": 25.1, "cbam_s": 26.1, "fc_s": 26.9, "rga_s": 28.3, "cbam_c": 26.4, "fc_c": 26.4}
# every selectable model, in the paper's order (Table 2's rows, then the other RGA combinations)
PARAM_ORDER = ("baseline", "cbam_s", "fc_s", "nl", "snl", "rga_s", "se", "cbam_c", "fc_c", "rga_c",
               "cbam_cs", "fc_s_par_c", "rga_sc", "rga_cs", "rga_s_par_c")


def count_parameters(name: str, num_classes: int = 751, *, height: int = 256, width: int = 128,
                     backbone: str = "resnet50", **rga_options) -> int:
    """Number of parameters of ``build_model(name, ...)``, built on the meta device (no memory, fast)."""
    with torch.device("meta"):
        model = build_model(name, num_classes, height=height, width=width, pretrained=False, backbone=backbone,
                            **rga_options)
    return sum(p.numel() for p in model.parameters())


def parameter_table(num_classes: int = 751, *, height: int = 256, width: int = 128, backbone: str = "resnet50"):
    """[(name, label, our count, the paper's Table 3 count in millions or None)] for every model."""
    return [(name, PAPER_LABELS[name], count_parameters(name, num_classes, height=height, width=width,
                                                         backbone=backbone), PAPER_TABLE3.get(name))
            for name in PARAM_ORDER]


def format_parameter_table(rows, compare: bool = True) -> str:
    lines = ["| model | name | ours (M) | paper Table 3 (M) | delta (M) |", "|---|---|---|---|---|"]
    for name, label, n, paper in rows:
        ours = n / 1e6
        if compare and paper is not None:
            lines.append(f"| {label} | `{name}` | {ours:.2f} | {paper:.1f} | {ours - paper:+.2f} |")
        else:
            lines.append(f"| {label} | `{name}` | {ours:.2f} | - | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .errors import run_cli

    return run_cli("rga.models", _models_command, argv)


def _models_command(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m rga.models", description="Facts about the models of rga.build_model.")
    p.add_argument("--params", action="store_true", help="print every model's parameter count next to the paper's Table 3")
    p.add_argument("--num-classes", type=int, default=751, help="classifier size (751: Market-1501, as in Table 3)")
    p.add_argument("--backbone", default="resnet50", choices=sorted(BACKBONES))
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    args = p.parse_args(argv)
    if not args.params:
        p.print_help()
        return 0
    compare = (args.backbone, args.height, args.width, args.num_classes) == ("resnet50", 256, 128, 751)
    print(f"parameters, {args.backbone}, {args.height}x{args.width}, {args.num_classes} classes "
          f"(attention after every stage, BN neck, bias-free classifier)")
    print(format_parameter_table(parameter_table(args.num_classes, height=args.height, width=args.width,
                                                 backbone=args.backbone), compare))
    if compare:
        print("paper Table 3: baseline 25.1, CBAM-S 26.1, FC-S 26.9, RGA-S 28.3, CBAM-C 26.4, FC-C 26.4; the NL, SE "
              "and RGA-C cells are lost in the text extraction of the paper (the header names them, the row has no "
              "value), and the paper gives no count for the other rows. Readings behind each design: rga/attention.py.")
    else:
        print("(the paper's Table 3 is for resnet50, 256x128, 751 classes: not compared here)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
