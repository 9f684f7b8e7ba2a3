"""The other attention designs of the paper's Table 2, re-implemented for the same ResNet + BN-neck model.

The RGA paper (Zhang et al., CVPR 2020, Section 4.2 and Table 2) compares RGA against other
attention designs "re-implemented on top of our baseline", placed where RGA is placed (after each
ResNet stage). It describes them in a few words each; this file gives one small module per design,
each citing its source and saying which reading we took where the RGA paper is vague.

Every module maps a (B, C, H, W) feature map to a tensor of the same shape, like ``RGAModule``.
Like ``RGAModule``'s ``keep_attention`` switch, setting ``module.keep_attention = True`` makes the
next forward store its (detached) attention in ``module.last_attention``: a dict with
``"spatial"`` (B, 1, H, W) and/or ``"channel"`` (B, C, 1, 1) for the gating designs (values in
(0, 1), the multiplicative mask), ``"context"`` (B, 1, H, W) for SNL (its softmax pooling weights,
which sum to 1 over the positions). NL keeps nothing (an empty dict; its attention is (B, N, N));
:meth:`NonLocal.relation` returns it.

Parameter counts: the paper's Table 3 (751 classes, ResNet-50, 256×128) gives baseline 25.1 M,
CBAM-S 26.1, FC-S 26.9, RGA-S 28.3, CBAM-C 26.4, FC-C 26.4 (the NL, SE and RGA-C cells are lost
in our copy of the paper). The defaults below were chosen to be faithful to the cited designs and,
where the paper leaves a free choice (a reduction ratio, a 1×1 embedding), to land near those
counts; ``python -m rga.models --params`` prints ours next to the paper's.

Names (``DESIGNS``), as selectable in ``rga.build_model``:

=============  ==========  =============================================================
name           paper       module
=============  ==========  =============================================================
cbam_s         CBAM-S      :class:`CBAMSpatial`
cbam_c         CBAM-C      :class:`CBAMChannel`
cbam_cs        CBAM-CS     :class:`CBAM` (channel, then spatial: CBAM's own order)
se             SE          :class:`SqueezeExcitation`
fc_s           FC-S        :class:`FCSpatial`
fc_c           FC-C        :class:`FCChannel`
fc_s_par_c     FC-S//C     :class:`FCParallel`
nl             NL          :class:`NonLocal`
snl            SNL         :class:`SimplifiedNonLocal`
=============  ==========  =============================================================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import _conv_bn_relu  # 1x1 conv + BN + ReLU: the embedding RGA uses for θ, φ, g
from .registry import DESIGN_LABELS

__all__ = ["CBAMSpatial", "CBAMChannel", "CBAM", "SqueezeExcitation", "FCSpatial", "FCChannel", "FCParallel",
           "NonLocal", "SimplifiedNonLocal", "DESIGNS", "build_design"]


def _reduced(n: int, ratio: int, what: str) -> int:
    if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 1:
        raise ValueError(f"{what} must be a positive int, got {ratio!r}")
    return max(1, n // ratio)


class _Attention(nn.Module):
    """Shared plumbing: input checks and the ``keep_attention`` / ``last_attention`` switch."""

    def __init__(self, in_channels: int, spatial_size=None):
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        self.spatial_size = None if spatial_size is None else (int(spatial_size[0]), int(spatial_size[1]))
        self.keep_attention = False
        self.last_attention: dict[str, torch.Tensor] = {}

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a (B, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} was built for {self.in_channels} channels but got {x.shape[1]}")
        if self.spatial_size is not None and tuple(x.shape[2:]) != self.spatial_size:
            h, w = self.spatial_size
            raise ValueError(f"{type(self).__name__} was built for {h}x{w} feature maps but got "
                             f"{x.shape[2]}x{x.shape[3]}" + getattr(self, "_size_hint", ""))

    #: the name under which a one-map design keeps its map (``last_attention``)
    kept_as = "spatial"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x ⊙ a`` for the designs with one map ``a = self.attention(x)``; the others override it."""
        self._check(x)
        a = self.attention(x)
        self._keep(**{self.kept_as: a})
        return x * a

    def _keep(self, **maps) -> None:
        if self.keep_attention:
            self.last_attention = {k: v.detach() for k, v in maps.items()}

    def extra_repr(self) -> str:
        s = f"{self.in_channels}"
        if self.spatial_size is not None:
            s += f", spatial_size={self.spatial_size}"
        return s


# ----------------------------------------------------------------------------------------------
# CBAM (Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018)
# ----------------------------------------------------------------------------------------------

class CBAMSpatial(_Attention):
    """CBAM's spatial attention (Woo et al., ECCV 2018, Sec. 3 "Spatial attention module").

    ``a = σ(BN(conv7×7([max_c(e), mean_c(e)])))``, ``out = a ⊙ x``: the max and the mean over
    channels stacked as a 2-channel map, one 7×7 convolution (padding 3) with BN (as in the
    authors' code), a sigmoid.

    Reading: the RGA paper says its re-implementations embed the features with 1×1 convolutions
    before pooling (Section 4.2, said of the channel designs). We take that for the spatial
    designs too: ``e = ReLU(BN(conv1×1(x)))`` from C to C/``embed_ratio`` channels (RGA-S's own
    ``gx`` embedding) before the channel pooling; ``embed_ratio=None`` gives CBAM as published.
    With the embedding our ResNet-50 CBAM-S has 25.75 M parameters against the paper's 26.1 M;
    without it 25.05 M. We found no reading that gives 26.1 M exactly.
    """

    def __init__(self, in_channels: int, spatial_size=None, kernel_size: int = 7, embed_ratio: int | None = 8):
        super().__init__(in_channels, spatial_size)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        self.embed = None if embed_ratio is None else _conv_bn_relu(in_channels, _reduced(in_channels, embed_ratio,
                                                                                          "embed_ratio"))
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        e = x if self.embed is None else self.embed(x)
        pooled = torch.cat([e.amax(1, keepdim=True), e.mean(1, keepdim=True)], 1)
        return torch.sigmoid(self.bn(self.conv(pooled)))  # (B, 1, H, W)

    kept_as = "spatial"


class CBAMChannel(_Attention):
    """CBAM's channel attention (Woo et al., ECCV 2018, Sec. 3 "Channel attention module").

    ``a = σ(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one MLP C → C/r → C (ReLU between, with
    biases, as published) shared by the two pooled vectors; ``out = a ⊙ x``.

    Reading: the RGA paper gives no ratio; CBAM's default is r = 16. We use r = 8 (RGA's own
    reduction), which gives 26.44 M parameters for ResNet-50, the paper's 26.4 M (r = 16:
    25.75 M). No 1×1 embedding here: with one, no ratio reaches 26.4 M.
    """

    def __init__(self, in_channels: int, spatial_size=None, reduction: int = 8):
        super().__init__(in_channels, spatial_size)
        hidden = _reduced(in_channels, reduction, "reduction")
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, in_channels))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))
        return torch.sigmoid(logits)[:, :, None, None]  # (B, C, 1, 1)

    kept_as = "channel"


class CBAM(_Attention):
    """CBAM-CS: CBAM's channel attention, then its spatial attention on the channel-refined map.

    Woo et al. (ECCV 2018) found channel-first best; the RGA paper's "CBAM-CS" row is that order.
    The parts are :class:`CBAMChannel` and :class:`CBAMSpatial` with their defaults.
    """

    def __init__(self, in_channels: int, spatial_size=None, reduction: int = 8, kernel_size: int = 7,
                 embed_ratio: int | None = 8):
        super().__init__(in_channels, spatial_size)
        self.channel = CBAMChannel(in_channels, spatial_size, reduction)
        self.spatial = CBAMSpatial(in_channels, spatial_size, kernel_size, embed_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        a_c = self.channel.attention(x)
        y = x * a_c
        a_s = self.spatial.attention(y)
        self._keep(channel=a_c, spatial=a_s)
        return y * a_s


# ----------------------------------------------------------------------------------------------
# SE (Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018)
# ----------------------------------------------------------------------------------------------

class SqueezeExcitation(_Attention):
    """Squeeze-and-excitation (Hu et al., CVPR 2018): ``a = σ(FC(ReLU(FC(avgpool(x)))))``.

    Two fully connected layers C → C/r → C with biases, r = 16 (the SE paper's default; the RGA
    paper gives none, and its SE cell of Table 3 is lost in our copy). Placed after each stage
    like RGA, not inside every residual block as in SE-ResNet.
    """

    def __init__(self, in_channels: int, spatial_size=None, reduction: int = 16):
        super().__init__(in_channels, spatial_size)
        hidden = _reduced(in_channels, reduction, "reduction")
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        a = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))[:, :, None, None]
        self._keep(channel=a)
        return x * a


# ----------------------------------------------------------------------------------------------
# FC-S, FC-C, FC-S//C (the RGA paper's description of HA-CNN's attention: Li, Zhu, Gong,
# "Harmonious Attention Network for Person Re-Identification", CVPR 2018)
# ----------------------------------------------------------------------------------------------

class FCSpatial(_Attention):
    """FC-S: a fully connected map over the channel-pooled spatial map (RGA paper Sec. 4.2, citing [23]).

    ``e = ReLU(BN(conv1×1(x)))`` (C → C/``embed_ratio``), ``m = mean_c(e)`` flattened to N = H·W
    values, ``a = σ(BN(FC(ReLU(BN(FC(m))))))`` with N → N/``reduction`` → N, reshaped to (H, W).

    Reading: the paper says only "fully connection over the (channel-pooled) spatial feature maps";
    a single N → N layer would cost N² = 4.2 M parameters at stage 1 (N = 64·32), so we use RGA's
    bottleneck (s2 = 8) and its BN/ReLU pattern, and the 1×1 embedding the paper mentions. That
    gives ResNet-50 FC-S 26.87 M parameters, the paper's 26.9 M. Needs the map size (H, W).
    (HA-CNN's own spatial attention is a 3×3 convolution, not a fully connected layer; we follow
    the RGA paper's description.)
    """

    def __init__(self, in_channels: int, spatial_size, embed_ratio: int = 8, reduction: int = 8):
        if spatial_size is None:
            raise ValueError("FCSpatial needs spatial_size=(H, W): its fully connected layer has H*W inputs")
        super().__init__(in_channels, spatial_size)
        n = self.spatial_size[0] * self.spatial_size[1]
        hidden = _reduced(n, reduction, "reduction")
        self.embed = _conv_bn_relu(in_channels, _reduced(in_channels, embed_ratio, "embed_ratio"))
        self.fc = nn.Sequential(nn.Linear(n, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, n, bias=False), nn.BatchNorm1d(n))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        m = self.embed(x).mean(1).reshape(b, h * w)
        return torch.sigmoid(self.fc(m)).reshape(b, 1, h, w)

    kept_as = "spatial"


class FCChannel(_Attention):
    """FC-C: a fully connected layer over the spatially average-pooled, embedded features (RGA paper Sec. 4.2, [23]).

    ``e = ReLU(BN(conv1×1(x)))`` (C → C/``embed_ratio``), ``a = σ(BN(FC(avgpool(e))))`` with one
    FC layer C/``embed_ratio`` → C. The paper: "FC-C uses a FC layer over spatially average pooled
    features. Before their pooling, the features are further embedded through 1×1 convolutions."
    With ``embed_ratio`` 8 ResNet-50 FC-C has 26.44 M parameters, the paper's 26.4 M.
    """

    def __init__(self, in_channels: int, spatial_size=None, embed_ratio: int = 8):
        super().__init__(in_channels, spatial_size)
        mid = _reduced(in_channels, embed_ratio, "embed_ratio")
        self.embed = _conv_bn_relu(in_channels, mid)
        self.fc = nn.Sequential(nn.Linear(mid, in_channels, bias=False), nn.BatchNorm1d(in_channels))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(self.embed(x).mean((2, 3))))[:, :, None, None]

    kept_as = "channel"


class FCParallel(_Attention):
    """FC-S//C: :class:`FCSpatial` and :class:`FCChannel` computed from the same input, applied jointly.

    ``out = x · a_s(x) · a_c(x)``: one 3-D mask, the product of the two (HA-CNN's way of joining
    its spatial and channel attention, and the fusion our RGA-S//C uses).
    """

    def __init__(self, in_channels: int, spatial_size, embed_ratio: int = 8, reduction: int = 8):
        super().__init__(in_channels, spatial_size)
        self.spatial = FCSpatial(in_channels, spatial_size, embed_ratio, reduction)
        self.channel = FCChannel(in_channels, spatial_size, embed_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        a_s, a_c = self.spatial.attention(x), self.channel.attention(x)
        self._keep(spatial=a_s, channel=a_c)
        return x * a_s * a_c


# ----------------------------------------------------------------------------------------------
# Non-local (Wang, Girshick, Gupta, He, "Non-local Neural Networks", CVPR 2018) and the
# simplified non-local of GCNet (Cao, Xu, Lin, Wei, Hu, "GCNet: Non-local Networks Meet
# Squeeze-Excitation Networks and Beyond", ICCV workshops 2019)
# ----------------------------------------------------------------------------------------------

class NonLocal(_Attention):
    """Non-local block, embedded-Gaussian version (Wang et al., CVPR 2018, Eq. 1-3 and Fig. 2).

    θ, φ, g: 1×1 convolutions C → C/2; ``f = softmax_j(θ_iᵀ φ_j)`` over the N = H·W positions;
    ``y_i = Σ_j f_ij g_j``; ``z = BN(W_z y) + x`` with W_z: 1×1 C/2 → C and the BN's scale
    initialised to zero, so a new block is the identity (Wang et al. Sec. 4.1).

    Reading: no subsampling of φ and g (Wang et al. optionally max-pool them; the RGA paper does
    not say) and a block after every stage, like RGA. ResNet-50 NL: 36.2 M parameters (the paper
    says only that NL has more than RGA-S's 28.3 M; its cell is lost in our copy).
    """

    def __init__(self, in_channels: int, spatial_size=None, reduction: int = 2):
        super().__init__(in_channels, spatial_size)
        inter = _reduced(in_channels, reduction, "reduction")
        self.inter_channels = inter
        self.theta = nn.Conv2d(in_channels, inter, 1)
        self.phi = nn.Conv2d(in_channels, inter, 1)
        self.g = nn.Conv2d(in_channels, inter, 1)
        self.W = nn.Sequential(nn.Conv2d(inter, in_channels, 1), nn.BatchNorm2d(in_channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def relation(self, x: torch.Tensor) -> torch.Tensor:
        """The pairwise weights f (B, N, N), row i = the weights position i gathers from all positions."""
        b = x.shape[0]
        theta = self.theta(x).reshape(b, self.inter_channels, -1)
        phi = self.phi(x).reshape(b, self.inter_channels, -1)
        return torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        b, _, h, w = x.shape
        f = self.relation(x)
        g = self.g(x).reshape(b, self.inter_channels, -1)
        y = (g @ f.transpose(1, 2)).reshape(b, self.inter_channels, h, w)  # y_i = Σ_j f_ij g_j
        return self.W(y) + x


class SimplifiedNonLocal(_Attention):
    """SNL: GCNet's simplified non-local block (Cao et al. 2019, Sec. 3.2-3.3, Fig. 4).

    ``p = softmax_j(W_k x_j)`` (one 1×1 conv C → 1, so the pooling weights are the same for every
    query position), ``c = Σ_j p_j x_j`` (C-vector), ``z_i = x_i + T(c)`` added at every position.

    Reading: the RGA paper describes SNL only as "a simplified scheme of non-local [5], which
    determines the weight for aggregation using only the source feature itself". The transform T
    we use is GCNet's bottleneck (C → C/r, ReLU, C/r → C, r = 16) without its LayerNorm, i.e. the
    global-context block minus LN; ``layer_norm=True`` gives GCNet's GC block, ``reduction=None``
    the one-conv transform of GCNet's Fig. 4(b) (C → C, 5.6 M extra parameters in ResNet-50). The
    last conv of T starts at zero (as in GCNet's code), so a new block is the identity.
    """

    def __init__(self, in_channels: int, spatial_size=None, reduction: int | None = 16, layer_norm: bool = False):
        super().__init__(in_channels, spatial_size)
        self.mask = nn.Conv2d(in_channels, 1, 1)
        if reduction is None:
            self.transform = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1))
        else:
            hidden = _reduced(in_channels, reduction, "reduction")
            layers = [nn.Conv2d(in_channels, hidden, 1)]
            if layer_norm:
                layers.append(nn.LayerNorm([hidden, 1, 1]))
            layers += [nn.ReLU(inplace=True), nn.Conv2d(hidden, in_channels, 1)]
            self.transform = nn.Sequential(*layers)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        b, c, h, w = x.shape
        p = torch.softmax(self.mask(x).reshape(b, 1, h * w), dim=-1)  # (B, 1, N)
        context = (x.reshape(b, c, h * w) @ p.transpose(1, 2)).reshape(b, c, 1, 1)
        self._keep(context=p.reshape(b, 1, h, w))
        return x + self.transform(context)


_CLASSES = {"cbam_s": CBAMSpatial, "cbam_c": CBAMChannel, "cbam_cs": CBAM, "se": SqueezeExcitation,
            "fc_s": FCSpatial, "fc_c": FCChannel, "fc_s_par_c": FCParallel, "nl": NonLocal,
            "snl": SimplifiedNonLocal}
# name -> (class, the paper's row label); the names and labels are rga.registry.DESIGN_LABELS'
DESIGNS = {name: (_CLASSES[name], label) for name, label in DESIGN_LABELS.items()}


def build_design(name: str, in_channels: int, spatial_size, **kwargs) -> nn.Module:
    """One attention module of ``DESIGNS`` by name, for a (in_channels, *spatial_size) feature map."""
    if name not in DESIGNS:
        raise ValueError(f"unknown attention design {name!r}; choose one of {sorted(DESIGNS)}")
    return DESIGNS[name][0](in_channels, spatial_size, **kwargs)
