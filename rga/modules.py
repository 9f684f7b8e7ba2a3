"""Relation-Aware Global Attention modules (RGA-S, RGA-C and their combinations).

One class, :class:`RGAModule`, with two forward paths over the same parameters:

* the reference path (``fused=False``) follows the public implementation's op order: it builds the
  relation matrix R (N×N spatial, C×C channel), stacks [R(i,:), R(:,i)] as 2N channels and applies
  the relation embedding as a 1x1 convolution. It is the oracle.
* the fused path (``fused=True`` or a backend name) never builds R: the relation embedding goes
  through ``rga_kernels.relation_embed`` (the identity Z = (A·φᵀ)·θ + (B·θᵀ)·φ, see csrc/relation.h);
  theta, phi and g are one GEMM with concatenated weights; their three batch norms are one
  ``batch_norm`` call on concatenated parameters (running statistics written back to each module);
  the concat [mean(g), z] is never materialised (the first attention conv is split in two GEMMs);
  in eval mode every batch norm is folded into the weight of the linear map that produces its input.

Parameter names and shapes are those of the public implementation's checkpoints
(``theta_spatial.0.weight``, ``W_spatial.4.running_mean``, ...), so a public state dict loads with
``strict=True`` for the default configuration.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bn_groups import _gemm, _linear_bn, _plain_bn, _tie_parameters, _tie_running_stats, _untie_state_dict
from .fused_branches import PlanCache

ORDERS = ("sc", "cs", "parallel")
EMBEDDINGS = ("asymmetric", "symmetric", "none")
#: how the last BatchNorm of each attention branch (``W_*.4``, the gate logits) starts:
#: "public" as in the public code (gamma = 1) or "zero" (gamma = 0: every gate starts at
#: sigmoid(0) = 0.5 on every position/channel and the branch learns away from that neutral start,
#: as non-local blocks zero their last BN). Beyond the paper; see README "Gate initialisation".
GATE_INITS = ("public", "zero")
BACKENDS = ("auto", "reference", "torch", "cpp", "cuda", "triton")


def _relation_embed(theta: torch.Tensor, phi: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    """(B, d, n), (B, d, n), (M, 2n) -> (B, M, n). rga_kernels is imported on first use, so that
    ``import rga`` stays light and TRITON_INTERPRET set after it still takes effect."""
    from rga_kernels import relation_embed

    return relation_embed(theta, phi, weight, backend=backend)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _attention_mlp(cin: int, hidden: int) -> nn.Sequential:
    # indices 0..4 as in the public checkpoints: conv, BN, ReLU, conv, BN
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, 1, 1, bias=False), nn.BatchNorm2d(1),
    )


def _retie_after_load(module, _incompatible_keys) -> None:
    module._tie_buffers()


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------

class RGAModule(PlanCache, nn.Module):
    """Relation-aware global attention over a (B, C, H, W) feature map of fixed size (H, W).

    Args:
        in_channels: C.
        spatial_size: (H, W) the module is built for (the spatial relation embedding has 2·H·W
            inputs and the channel embeddings H·W, so other sizes are rejected).
        use_spatial, use_channel: RGA-S and RGA-C branches.
        order: with both branches, "sc" (RGA-SC: spatial then channel, the paper's best), "cs"
            (channel then spatial) or "parallel" (RGA-S//C: both attentions computed from the same
            input and applied jointly, out = x · σ(s(x)) · σ(c(x))).
        cha_ratio: channel reduction s1 (spatial θ/φ/g: C → C/cha_ratio; channel relation
            embedding: 2C → C/cha_ratio).
        spa_ratio: spatial reduction s1 (channel θ/φ/g: HW → HW/spa_ratio; spatial relation
            embedding: 2HW → HW/spa_ratio).
        down_ratio: s2, the attention MLP's hidden width is max(1, width // down_ratio).
        use_relation: include the relation feature (False: Table 1 "w/o Rel.", y = [pool(g(x))]).
        use_original: include the pooled feature embedding (False: Table 1 "w/o Ori.", y = [z]).
        embedding: "asymmetric" (θ ≠ φ), "symmetric" (θ = φ, one embedding ``theta_*``) or "none"
            (relations of the raw features, no θ/φ parameters), Table 4.
        fused: False for the reference path; True (backend "auto") or a backend name for the fused
            path through ``rga_kernels.relation_embed``. Settable after construction.
        gate_init: "public" (the public code's: the last BN of each attention branch starts at
            gamma = 1) or "zero" (gamma = 0 there: every gate starts at exactly 0.5, a neutral
            start; see GATE_INITS). Only the initial values differ; state dicts are the same.

    Attention maps: set ``module.keep_attention = True`` and after each forward
    ``module.last_attention`` holds the detached maps, ``"spatial"`` (B, 1, H, W) and/or
    ``"channel"`` (B, C, 1, 1), the same on both paths (for figures and analysis; off by default).
    With order "cs" the spatial map is the one computed from the channel-gated input.
    """

    def __init__(
        self,
        in_channels: int,
        spatial_size: tuple[int, int],
        use_spatial: bool = True,
        use_channel: bool = True,
        order: str = "sc",
        cha_ratio: int = 8,
        spa_ratio: int = 8,
        down_ratio: int = 8,
        use_relation: bool = True,
        use_original: bool = True,
        embedding: str = "asymmetric",
        fused: bool | str = False,
        gate_init: str = "public",
    ):
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        if not isinstance(spatial_size, (tuple, list)) or len(spatial_size) != 2:
            raise TypeError(f"spatial_size must be a (H, W) pair, got {spatial_size!r}")
        h, w = (_check_positive_int(f"spatial_size[{i}]", s) for i, s in enumerate(spatial_size))
        for name, value in (("cha_ratio", cha_ratio), ("spa_ratio", spa_ratio), ("down_ratio", down_ratio)):
            _check_positive_int(name, value)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {gate_init!r}")
        if not (use_spatial or use_channel):
            raise ValueError("RGAModule needs at least one of use_spatial, use_channel")
        if not (use_relation or use_original):
            raise ValueError("RGAModule needs at least one of use_relation, use_original")

        self.in_channels = in_channels
        self.spatial_size = (h, w)
        self.use_spatial, self.use_channel = bool(use_spatial), bool(use_channel)
        self.order = order
        self.cha_ratio, self.spa_ratio, self.down_ratio = cha_ratio, spa_ratio, down_ratio
        self.use_relation, self.use_original = bool(use_relation), bool(use_original)
        self.embedding = embedding
        self.gate_init = gate_init
        self.fused = fused

        n = h * w
        self.inter_channel = in_channels // cha_ratio
        self.inter_spatial = n // spa_ratio
        # branch -> (feature dim of a node, its reduced dim, number of nodes, reduced relation dim)
        dims = {}
        if self.use_spatial:
            dims["spatial"] = (in_channels, self.inter_channel, n, self.inter_spatial)
        if self.use_channel:
            dims["channel"] = (n, self.inter_spatial, in_channels, self.inter_channel)
        for branch, (feat, feat_red, nodes, rel_red) in dims.items():
            if feat_red < 1 or (self.use_relation and rel_red < 1):
                raise ValueError(
                    f"{branch} branch: reductions leave no channels (feature dim {feat} -> {feat_red}, "
                    f"relation dim {2 * nodes} -> {rel_red}); lower cha_ratio/spa_ratio"
                )
            if self.use_relation:
                if embedding != "none":
                    setattr(self, f"theta_{branch}", _conv_bn_relu(feat, feat_red))
                if embedding == "asymmetric":
                    setattr(self, f"phi_{branch}", _conv_bn_relu(feat, feat_red))
            if self.use_original:
                setattr(self, f"gx_{branch}", _conv_bn_relu(feat, feat_red))
            if self.use_relation:
                setattr(self, f"gg_{branch}", _conv_bn_relu(2 * nodes, rel_red))
            width = int(self.use_original) + (rel_red if self.use_relation else 0)
            setattr(self, f"W_{branch}", _attention_mlp(width, max(1, width // down_ratio)))
            if gate_init == "zero":
                nn.init.zeros_(getattr(self, f"W_{branch}")[4].weight)
        self.keep_attention = False
        self.last_attention: dict[str, torch.Tensor] = {}
        self._tie_buffers()
        self.register_load_state_dict_post_hook(_retie_after_load)  # (a named function: picklable)
        self._register_state_dict_hook(_untie_state_dict)

    # -- tied BN statistics (fused path) ----------------------------------------------------------
    def _embedding_bns(self, branch: str) -> list:
        """The BNs of θ, φ and g of a branch, in the order the fused path normalises them."""
        return [getattr(self, f"{name}_{branch}")[1] for name in self._embedding_names()
                if hasattr(self, f"{name}_{branch}")]

    def _embedding_names(self) -> list:
        names = []
        if self.use_relation and self.embedding != "none":
            names.append("theta")
            if self.embedding == "asymmetric":
                names.append("phi")
        if self.use_original:
            names.append("gx")
        return names

    def _tie_buffers(self) -> None:
        self._forget_plan()
        for branch in ("spatial", "channel"):
            _tie_running_stats(self._embedding_bns(branch))
            seqs = [getattr(self, f"{name}_{branch}") for name in self._embedding_names()
                    if hasattr(self, f"{name}_{branch}")]
            for params in ([s[0].weight for s in seqs], [s[1].weight for s in seqs], [s[1].bias for s in seqs]):
                _tie_parameters(params)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .double() give every buffer its own new tensor: tie them again
        super()._apply(fn, recurse)
        self._tie_buffers()
        return self

    # -- configuration ---------------------------------------------------------------------------
    @property
    def fused(self) -> bool | str:
        return self._fused

    @fused.setter
    def fused(self, value: bool | str) -> None:
        if isinstance(value, bool):
            pass
        elif isinstance(value, str):
            if value not in BACKENDS:
                raise ValueError(f"fused must be a bool or one of {BACKENDS}, got {value!r}")
        else:
            raise TypeError(f"fused must be a bool or a backend name, got {type(value).__name__}")
        self._fused = value

    @property
    def backend(self) -> str | None:
        """The relation_embed backend of the fused path, None for the reference path."""
        if self._fused is False:
            return None
        return "auto" if self._fused is True else self._fused

    def extra_repr(self) -> str:
        branches = "+".join(b for b, on in (("S", self.use_spatial), ("C", self.use_channel)) if on)
        s = f"{self.in_channels}, spatial_size={self.spatial_size}, branches={branches}"
        if self.use_spatial and self.use_channel:
            s += f", order={self.order!r}"
        if not self.use_relation:
            s += ", use_relation=False"
        if not self.use_original:
            s += ", use_original=False"
        if self.embedding != "asymmetric":
            s += f", embedding={self.embedding!r}"
        if self.gate_init != "public":
            s += f", gate_init={self.gate_init!r}"
        return s + f", fused={self._fused!r}"

    # -- input checks ------------------------------------------------------------------------------
    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"RGAModule expects a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"RGAModule expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"RGAModule was built for {self.in_channels} channels but got {x.shape[1]}")
        h, w = x.shape[2], x.shape[3]
        if (h, w) != self.spatial_size:
            H, W = self.spatial_size
            raise ValueError(
                f"RGAModule was built for {H}x{W} feature maps (spatial_size=({H}, {W})) but got {h}x{w}; "
                f"build it with spatial_size=({h}, {w}) for this input"
                + getattr(self, "_size_hint", "")
            )

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not torch.compiler.is_compiling() and x.shape[0] == 0:  # no samples: nothing to attend to (and batch statistics would be undefined)
            return x.clone()
        if self._fused is False or (not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()):
            # under torch.func transforms (vmap, grad, jacrev...): the plain path, which they can
            # transform (the fused path's autograd Functions cannot be)
            return self._forward_reference(x)
        return self._forward_fused(x)

    def _record(self, name: str, a: torch.Tensor, shape) -> None:
        if self.keep_attention:
            self.last_attention[name] = a.detach().reshape(shape)

    def _combine(self, x, spatial, channel, joint=False):
        """Apply the branches in the configured order; spatial/channel map x to its gated version
        (joint: channel(x, target) gates the target itself, as the fused path's branches do)."""
        if self.keep_attention:
            self.last_attention = {}
        if not self.use_channel:
            return spatial(x)[0]
        if not self.use_spatial:
            return channel(x)[0]
        if self.order == "sc":
            return channel(spatial(x)[0])[0]
        if self.order == "cs":
            return spatial(channel(x)[0])[0]
        # parallel: both attentions from the same input, applied jointly: (x · a_s) · a_c
        gated_s, _ = spatial(x)
        if joint:
            return channel(x, gated_s)[0]
        _, a_c = channel(x)
        return gated_s * a_c

    # Reference path (public op order) ----------------------------------------------------------
    def _forward_reference(self, x):
        return self._combine(x, self._spatial_reference, self._channel_reference)

    def _attention_input_reference(self, branch, node_major, nodes_fn):
        """Shared body: ``node_major`` is the conv input of θ/φ/g (4-D), returns W_branch's logits."""
        parts = []
        if self.use_original:
            parts.append(getattr(self, f"gx_{branch}")(node_major).mean(1, keepdim=True))
        if self.use_relation:
            parts.append(getattr(self, f"gg_{branch}")(nodes_fn(node_major)))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return getattr(self, f"W_{branch}")(y)

    def _embed_reference(self, branch, inp, b):
        """θ and φ as (B, d, n) from the 4-D conv input (b, d_in, n-ish...)."""
        if self.embedding == "none":
            t = inp.reshape(b, inp.shape[1], -1)
            return t, t
        t = getattr(self, f"theta_{branch}")(inp).reshape(b, -1, inp.shape[2] * inp.shape[3])
        if self.embedding == "symmetric":
            return t, t
        return t, getattr(self, f"phi_{branch}")(inp).reshape(b, -1, inp.shape[2] * inp.shape[3])

    def _spatial_reference(self, x):
        b, c, h, w = x.shape
        n = h * w

        def relation(inp):
            theta, phi = self._embed_reference("spatial", inp, b)
            R = torch.matmul(theta.transpose(1, 2), phi)  # (b, n, n): R[i, j] = θ_i · φ_j
            # channel j at position i: R(i, j) (row i), then R(j, i) (column i)
            return torch.cat((R.transpose(1, 2).reshape(b, n, h, w), R.reshape(b, n, h, w)), 1)

        a = torch.sigmoid(self._attention_input_reference("spatial", x, relation))  # (b, 1, h, w)
        self._record("spatial", a, (b, 1, h, w))
        return a * x, a

    def _channel_reference(self, x):
        b, c, h, w = x.shape
        xc = x.reshape(b, c, h * w).transpose(1, 2).unsqueeze(-1)  # (b, hw, c, 1): channels are the nodes

        def relation(inp):
            theta, phi = self._embed_reference("channel", inp, b)  # (b, d, c)
            R = torch.matmul(theta.transpose(1, 2), phi)  # (b, c, c)
            return torch.cat((R.transpose(1, 2).unsqueeze(-1), R.unsqueeze(-1)), 1)  # (b, 2c, c, 1)

        logits = self._attention_input_reference("channel", xc, relation)  # (b, 1, c, 1)
        a = torch.sigmoid(logits.reshape(b, c, 1, 1))
        self._record("channel", a, (b, c, 1, 1))
        return a * x, a

    # Fused path ----------------------------------------------------------------------------------
    def _forward_fused(self, x):
        b, c, h, w = x.shape
        if self.training:
            self._count_batches()
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # (B, H, W, C) in memory: a (B, C, HW) view with the channels fastest, no copy; the
            # output keeps the channels_last layout
            x3 = x.permute(0, 2, 3, 1).reshape(b, h * w, c).transpose(1, 2)
        else:
            x3 = x.reshape(b, c, h * w)

        # the output keeps the input's dtype: a wider attention (an eval-mode folded BN shift
        # promotes it) is cast down; a narrower one (bf16 under autocast) is promoted by the
        # multiplication itself, with no separate cast launch
        def _like(a, t):
            return a if torch.promote_types(a.dtype, t.dtype) == t.dtype else a.to(t.dtype)

        kernels = self._plan()[1]
        if "chain" in kernels:  # every branch through rga_kernels' kernels, as one autograd node
            out, attention = kernels["chain"](x3)
            if self.keep_attention:
                self.last_attention = {}
                for name, a in attention.items():
                    self._record(name, a, (b, 1, h, w) if name == "spatial" else (b, c, 1, 1))
            return out.reshape(b, c, h, w)

        def spatial(t, target=None):
            if "spatial" in kernels:
                out, a = kernels["spatial"](t, target)
            else:
                a = _like(torch.sigmoid(self._branch_fused("spatial", t)), t)  # (b, 1, n)
                out = (t if target is None else target) * a
            self._record("spatial", a, (b, 1, h, w))
            return out, a

        def channel(t, target=None):
            if "channel" in kernels:  # nodes = channels: the branch runs on the transposed view
                out, a = kernels["channel"](t.transpose(1, 2), None if target is None else target.transpose(1, 2))
                out, a = out.transpose(1, 2), a.transpose(1, 2)
            else:
                a = torch.sigmoid(self._branch_fused("channel", t.transpose(1, 2))).transpose(1, 2)  # (b, c, 1)
                a = _like(a, t)
                out = (t if target is None else target) * a
            self._record("channel", a, (b, c, 1, 1))
            return out, a

        return self._combine(x3, spatial, channel, joint=True).reshape(b, c, h, w)

    def _kernel_branches(self):
        from .fused_branches import kernel_branches

        return kernel_branches(self)

    def _branch_args(self, branch: str, backend: str):
        from .fused_branches import branch_args

        return branch_args(self, branch, backend)

    def _branch_fused(self, branch: str, inp: torch.Tensor) -> torch.Tensor:
        """inp: (B, D, n) with nodes along the last axis (a view is fine). Returns logits (B, 1, n).

        Every BN here has had its num_batches_tracked incremented by _count_batches already.
        """
        names = self._embedding_names()
        seqs = [getattr(self, f"{name}_{branch}") for name in names]
        emb = {}
        if seqs:  # θ, φ and g: one GEMM, one batch norm, one ReLU
            weight = seqs[0][0].weight.flatten(1) if len(seqs) == 1 else \
                torch.cat([s[0].weight.flatten(1) for s in seqs])
            t = F.relu(_linear_bn(weight, [s[1] for s in seqs], lambda wt: _gemm(wt, inp, self.training),
                                  counted=True))
            emb = dict(zip(names, t.split([s[0].out_channels for s in seqs], 1)))

        parts = []
        if self.use_original:
            parts.append(emb["gx"].mean(1, keepdim=True))  # (B, 1, n)
        if self.use_relation:
            theta = emb.get("theta", inp)
            phi = emb.get("phi", theta)
            gg = getattr(self, f"gg_{branch}")
            parts.append(F.relu(_linear_bn(
                gg[0].weight.flatten(1), [gg[1]], lambda wt: _relation_embed(theta, phi, wt, self.backend),
                counted=True)))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # [mean(g), z]

        mlp = getattr(self, f"W_{branch}")
        hidden = F.relu(_linear_bn(mlp[0].weight.flatten(1), [mlp[1]], lambda wt: _gemm(wt, y, self.training),
                                   counted=True))
        return _linear_bn(mlp[3].weight.flatten(1), [mlp[4]], lambda wt: _gemm(wt, hidden, self.training),
                          counted=True)
