"""The paper's supervision: label-smoothed cross-entropy + batch-hard triplet loss (Section 4.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against (1 - eps)·one_hot + eps / C (Szegedy et al., 2016). Computed in fp32."""

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = float(epsilon)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.epsilon)


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) Euclidean distances, clamped away from 0 so sqrt has a finite gradient."""
    sq = x.pow(2).sum(dim=1, keepdim=True)
    d2 = sq + sq.t() - 2.0 * (x @ x.t())
    return d2.clamp_min(1e-12).sqrt()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al., 2017).

    For every anchor: the farthest same-identity sample and the closest other-identity sample;
    loss = mean(relu(d_ap - d_an + margin)). Anchors without any negative in the batch add 0.
    Computed in fp32. Also returns the fraction of anchors with d_an > d_ap (a training metric).
    """

    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.margin = float(margin)

    def forward(self, features: torch.Tensor, targets: torch.Tensor):
        dist = pairwise_euclidean(features.float())
        same = targets.view(-1, 1) == targets.view(1, -1)
        d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)
        d_an = dist.masked_fill(same, float("inf")).amin(dim=1)
        loss = F.relu(d_ap - d_an + self.margin).mean()
        return loss, (d_an > d_ap).float().mean()


class ReidLoss(nn.Module):
    """id_weight · CE_ls(logits) + triplet_weight · triplet(pooled feature) (BNNeck convention:
    the triplet loss sees the feature before the BN neck, the classifier the one after it)."""

    def __init__(self, epsilon: float = 0.1, margin: float = 0.3, id_weight: float = 1.0,
                 triplet_weight: float = 1.0):
        super().__init__()
        self.ce = CrossEntropyLabelSmooth(epsilon)
        self.triplet = TripletLoss(margin)
        self.id_weight, self.triplet_weight = float(id_weight), float(triplet_weight)

    def forward(self, outputs, targets):
        pooled, _bn_feat, logits = outputs
        loss_id = self.ce(logits, targets)
        loss_tri, tri_acc = self.triplet(pooled, targets)
        total = self.id_weight * loss_id + self.triplet_weight * loss_tri
        acc = (logits.detach().argmax(dim=1) == targets).float().mean()
        return total, {"loss": total.detach(), "loss_id": loss_id.detach(), "loss_tri": loss_tri.detach(),
                       "acc": acc, "tri_acc": tri_acc.detach()}
