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

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

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


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# Batch norm helpers for the fused path
#
# On a GPU an eager RGA step is bound by the number of operator launches, so the fused path keeps
# bookkeeping ops out of the step: the running statistics of the BNs that are normalised together
# (θ, φ and g of a branch) are views into one flat buffer ("tied"), which one batch_norm call
# updates in place (no concatenation, no copy back), and every num_batches_tracked counter of the
# module is incremented by one foreach op per forward.
# ----------------------------------------------------------------------------------------------

def _bn_uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


def _plain_bn(bn) -> bool:
    """A BatchNorm2d whose forward the fused path may replace by F.batch_norm (not a subclass such
    as SyncBatchNorm, which must run its own forward)."""
    return type(bn) is nn.BatchNorm2d


def _same_config(bns: Sequence[nn.BatchNorm2d]) -> bool:
    b0 = bns[0]
    return all(
        (b.training, b.momentum, b.eps, b.affine, b.track_running_stats)
        == (b0.training, b0.momentum, b0.eps, b0.affine, b0.track_running_stats)
        for b in bns
    )


def _momentum_factor(bn: nn.BatchNorm2d) -> float:
    """exponential_average_factor of nn.BatchNorm (num_batches_tracked already incremented)."""
    if not (bn.training and bn.track_running_stats):
        return 0.0
    if bn.momentum is None:  # cumulative moving average
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def _flat_base(tensors: Sequence[torch.Tensor]):
    """The 1-D tensor of which ``tensors`` are consecutive whole pieces, in order, or None."""
    base = tensors[0]._base
    if base is None or base.dim() != 1:
        return None
    offset = base.storage_offset()
    for t in tensors:
        if t._base is not base or t.dim() != 1 or t.storage_offset() != offset or t.stride(0) != 1:
            return None
        offset += t.numel()
    return base if offset == base.storage_offset() + base.numel() else None


def _tie_running_stats(bns: Sequence[nn.BatchNorm2d]) -> None:
    """Make the running_mean / running_var buffers of ``bns`` views of one flat buffer each."""
    if len(bns) < 2 or not all(_plain_bn(b) and b.track_running_stats and b.running_mean is not None
                               for b in bns):
        return
    for name in ("running_mean", "running_var"):
        parts = [getattr(b, name) for b in bns]
        if _flat_base(parts) is not None:
            continue
        if len({(p.device, p.dtype) for p in parts}) != 1:
            return
        flat = torch.cat([p.detach() for p in parts])
        for b, piece in zip(bns, flat.split([p.numel() for p in parts])):
            b._buffers[name] = piece


def _tie_parameters(params: Sequence[torch.Tensor]) -> None:
    """Put the parameters side by side in one storage (their .data become views of it), so the
    fused kernels read them as one matrix without a concatenation per step. Each stays its own
    Parameter (own gradient, own optimizer state); a copy or reassignment that separates them
    again only costs the kernels one concatenation."""
    params = [p for p in params if p is not None]
    if len(params) < 2 or len({(p.device, p.dtype) for p in params}) != 1:
        return
    ptr, size = params[0].data_ptr(), params[0].element_size()
    adjacent = True
    for p in params:
        if not p.is_contiguous() or p.data_ptr() != ptr:
            adjacent = False
            break
        ptr += p.numel() * size
    if adjacent:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()


def _batch_norm(y: torch.Tensor, bn: nn.BatchNorm2d, counted: bool = False) -> torch.Tensor:
    """nn.BatchNorm's forward on a (B, k, L) tensor (same statistics as BatchNorm2d on (B, k, H, W)).

    counted: num_batches_tracked was already incremented for this call (see RGAModule._count_batches).
    """
    if not _plain_bn(bn):  # e.g. SyncBatchNorm after convert_sync_batchnorm: its own forward
        return bn(y.unsqueeze(-1)).squeeze(-1)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None and not counted:
        bn.num_batches_tracked.add_(1)
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(
        y, bn.running_mean if track else None, bn.running_var if track else None,
        bn.weight, bn.bias, _bn_uses_batch_stats(bn), _momentum_factor(bn), bn.eps,
    )


def _batch_norm_group(y: torch.Tensor, bns: Sequence[nn.BatchNorm2d], counted: bool = False) -> torch.Tensor:
    """Batch norm of (B, sum k_i, L) by the modules ``bns`` (channel blocks in order), one pass."""
    if len(bns) == 1:
        return _batch_norm(y, bns[0], counted)
    b0 = bns[0]
    if not (all(_plain_bn(b) for b in bns) and _same_config(bns) and b0.affine and b0.track_running_stats):
        sizes = [b.num_features for b in bns]
        return torch.cat([_batch_norm(part, b, counted) for part, b in zip(y.split(sizes, 1), bns)], 1)
    if b0.training and not counted:
        for b in bns:
            b.num_batches_tracked.add_(1)
    running_mean = None if torch.compiler.is_compiling() else _flat_base([b.running_mean for b in bns])
    running_var = None if running_mean is None else _flat_base([b.running_var for b in bns])
    gamma_beta = torch.cat([b.weight for b in bns] + [b.bias for b in bns])
    gamma, beta = gamma_beta.chunk(2)
    if running_var is not None:  # tied buffers: batch_norm updates every module's statistics in place
        return F.batch_norm(y, running_mean, running_var, gamma, beta, b0.training, _momentum_factor(b0), b0.eps)
    # untied (buffers replaced from outside, or under torch.compile): concatenate and write back
    sizes = [b.num_features for b in bns]
    running_mean = torch.cat([b.running_mean for b in bns])
    running_var = torch.cat([b.running_var for b in bns])
    out = F.batch_norm(y, running_mean, running_var, gamma, beta, b0.training, _momentum_factor(b0), b0.eps)
    if b0.training:
        with torch.no_grad():
            for b, m, v in zip(bns, running_mean.split(sizes), running_var.split(sizes)):
                b.running_mean.copy_(m)
                b.running_var.copy_(v)
    return out


def _gemm(weight: torch.Tensor, inp: torch.Tensor, training: bool) -> torch.Tensor:
    """weight (k, D) applied to every sample of inp (B, D, n) -> (B, k, n).

    In training (a backward ahead): a 1x1 convolution, one op forward and one (convolution_backward, both
    gradients) backward, where a matmul with a broadcast weight costs a GEMM per gradient plus a
    batch reduction. In eval mode (inference): a GEMM, which the CPU runs about 1.5-3x faster
    than the equivalent convolution (torch.matmul folds the batch into one GEMM when inp's
    transpose is contiguous, the channel branch's view; otherwise a batched GEMM with a
    broadcast weight reads inp without copying it).
    """
    if training:  # by the module's mode, not by grad mode: eager and compiled runs take one path
        return F.conv1d(inp, weight.unsqueeze(-1))
    if inp.mT.is_contiguous():
        return torch.matmul(weight, inp)
    return torch.bmm(weight.expand(inp.shape[0], *weight.shape), inp)


def _linear_bn(weight: torch.Tensor, bns: Sequence[nn.BatchNorm2d], apply, counted: bool = False) -> torch.Tensor:
    """BN(apply(weight)) where ``apply`` is linear in ``weight`` (rows = output channels).

    With batch statistics: one batch_norm call over the group. With running statistics (eval): the
    affine BN is folded into the weight rows and a bias, so no separate normalisation pass.
    """
    if any(_bn_uses_batch_stats(b) or not _plain_bn(b) for b in bns) or not all(b.affine for b in bns):
        return _batch_norm_group(apply(weight), bns, counted)
    scale = torch.cat([b.weight * torch.rsqrt(b.running_var + b.eps) for b in bns])
    shift = torch.cat([b.bias for b in bns]) - torch.cat([b.running_mean for b in bns]) * scale
    return apply(weight * scale.unsqueeze(1)) + shift.unsqueeze(1)


def _untie_state_dict(module, state_dict, prefix, local_metadata):
    """state_dict() hands out independent tensors: the tied running statistics are views of one
    buffer, which some savers (safetensors) refuse."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and value._base is not None:
            state_dict[key] = value.clone()
    return state_dict


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------

class RGAModule(nn.Module):
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
        self.register_load_state_dict_post_hook(lambda module, _keys: module._tie_buffers())
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

    def _count_batches(self) -> None:
        """num_batches_tracked += 1 for every plain BN of the module that tracks statistics, in one op."""
        counters = self._plan()[2]
        if counters:
            torch._foreach_add_(counters, 1)

    # -- the fused path's plan, cached ---------------------------------------------------------------
    # What the fused path runs (which branches go through rga_kernels' kernels, with which
    # parameters and buffers) depends on the module's structure, its mode and its BNs' settings; it
    # is worked out once and reused while those stay the same (an eager step is host-bound).
    def _plan_key(self):
        return (self._fused, self.training, tuple((b.training, b.momentum, b.eps, b.track_running_stats, b.affine)
                                                  for b in self.__dict__.get("_plan_bns", ())))

    def _plan(self):
        if torch.compiler.is_compiling():  # traced: the composite path, nothing cached
            counters = [m.num_batches_tracked for m in self.modules() if _plain_bn(m) and m.training
                        and m.track_running_stats and m.num_batches_tracked is not None]
            return None, {}, counters
        plan = self.__dict__.get("_plan_cache")
        if plan is not None and plan[0] == self._plan_key():
            return plan
        self._tie_buffers()  # a deepcopy or a reassignment may have separated them
        self.__dict__["_plan_bns"] = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        kernels, counted = self._kernel_branches()
        counters = [m.num_batches_tracked for m in self._plan_bns
                    if _plain_bn(m) and m.training and m.track_running_stats and m.num_batches_tracked is not None
                    and not any(m.num_batches_tracked is c for c in counted)]
        plan = (self._plan_key(), kernels, counters)
        self.__dict__["_plan_cache"] = plan
        return plan

    def _forget_plan(self) -> None:
        self.__dict__.pop("_plan_cache", None)

    def __setattr__(self, name, value):
        # a replaced submodule, parameter or buffer (e.g. convert_sync_batchnorm) changes the plan
        if isinstance(value, (nn.Module, torch.Tensor)):
            self.__dict__.pop("_plan_cache", None)
        super().__setattr__(name, value)

    def train(self, mode: bool = True):
        self._forget_plan()
        return super().train(mode)

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
        if self._fused is False:
            return self._forward_reference(x)
        return self._forward_fused(x)

    def _record(self, name: str, a: torch.Tensor, shape) -> None:
        if self.keep_attention:
            self.last_attention[name] = a.detach().reshape(shape)

    def _combine(self, x, spatial, channel):
        """Apply the branches in the configured order; spatial/channel map x to its gated version."""
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
        if self._fused is not False:
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

        return self._combine(x3, spatial, channel).reshape(b, c, h, w)

    def _kernel_branches(self) -> dict:
        """(branch -> fn(inp, target) -> (gated target, attention) through rga_kernels' fused branch
        (its own kernels), for the branches where it applies (the others take _branch_fused); the
        num_batches_tracked counters those branches' kernels increment themselves)."""
        backend = self.backend
        if backend is None or torch.compiler.is_compiling():
            return {}, ()
        from rga_kernels.branch import FUSED_BRANCH_BACKENDS

        if backend == "auto":
            from rga_kernels.ops import _resolve_backend

            device = next(self.parameters()).device
            if device.type == "cpu":
                # On the CPU the composite path is the faster one (its BNs are ATen's vectorised
                # kernels, folded into the GEMMs in eval; measured side by side with
                # bench/bench_rga_module.py): "auto" keeps it there, and fused="cpp" runs the
                # C++ kernels (the cuda backend's code) on the CPU.
                return {}, ()
            backend = _resolve_backend("auto", device)
        if backend not in FUSED_BRANCH_BACKENDS:
            return {}, ()
        fns, counted = {}, ()
        for branch in ("spatial", "channel"):
            if getattr(self, f"use_{branch}"):
                args = self._branch_args(branch, backend)
                if args is not None:
                    fns[branch] = self._make_kernel_branch(*args)
                    counted += args[2].counters
        return fns, counted

    @staticmethod
    def _make_kernel_branch(spec, params, running):
        from rga_kernels.branch import fused_branch

        def run(inp, target):
            return fused_branch(spec, inp, params, running, target)

        return run

    def _branch_args(self, branch: str, backend: str):
        """(BranchSpec, BranchParams, BranchRunning) of a branch, or None where the kernels do not
        apply (BN subclasses such as SyncBatchNorm, differing BN settings, affine=False,
        momentum=None, untied running statistics): those run the composite path."""
        from rga_kernels.branch import BranchParams, BranchRunning, BranchSpec

        names = self._embedding_names()
        emb = [getattr(self, f"{name}_{branch}") for name in names]
        mods = emb + ([getattr(self, f"gg_{branch}")] if self.use_relation else [])
        mlp = getattr(self, f"W_{branch}")
        bns = [m[1] for m in mods] + [mlp[1], mlp[4]]
        if not (all(_plain_bn(b) and b.affine for b in bns) and _same_config(bns)) or bns[0].momentum is None:
            return None
        b0 = bns[0]
        track = b0.track_running_stats and b0.running_mean is not None
        emb_mean = emb_var = None
        if track and emb:
            emb_mean = _flat_base([m[1].running_mean for m in emb]) if len(emb) > 1 else emb[0][1].running_mean
            emb_var = _flat_base([m[1].running_var for m in emb]) if len(emb) > 1 else emb[0][1].running_var
            if emb_mean is None or emb_var is None:
                return None

        def idx(name):
            return names.index(name) if name in names else -1

        theta = idx("theta")
        phi = idx("phi") if self.embedding == "asymmetric" else theta
        spec = BranchSpec(
            groups=tuple(m[0].out_channels for m in emb), theta=theta, phi=phi, mean_group=idx("gx"),
            relation=self.use_relation, batch_stats=_bn_uses_batch_stats(b0), momentum=_momentum_factor(b0),
            eps=b0.eps, backend=backend)
        rel = getattr(self, f"gg_{branch}") if self.use_relation else None
        params = BranchParams(
            tuple(m[0].weight for m in emb), tuple(m[1].weight for m in emb), tuple(m[1].bias for m in emb),
            rel[0].weight if rel else None, rel[1].weight if rel else None, rel[1].bias if rel else None,
            mlp[0].weight, mlp[1].weight, mlp[1].bias, mlp[3].weight, mlp[4].weight, mlp[4].bias)

        def stats(bn):
            return (bn.running_mean, bn.running_var) if track else (None, None)

        counters = ()
        if backend in ("cpp", "cuda") and b0.training and track:  # incremented by the branch's kernels
            counters = tuple(b.num_batches_tracked for b in bns)
        running = BranchRunning(emb_mean, emb_var, *(stats(rel[1]) if rel else (None, None)), *stats(mlp[1]),
                                *stats(mlp[4]), counters)
        return spec, params, running

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
