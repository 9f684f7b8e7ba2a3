import math

import pytest
import torch

from rga.losses import CrossEntropyLabelSmooth, ReidLoss, TripletLoss, pairwise_euclidean


def test_label_smoothing_matches_hand_formula():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([0, 1])
    eps, c = 0.1, 3
    expected = 0.0
    for row, t in zip(logits, targets):
        logp = row - torch.logsumexp(row, 0)
        q = torch.full((c,), eps / c)
        q[t] += 1 - eps
        expected += -(q * logp).sum().item()
    expected /= 2
    got = CrossEntropyLabelSmooth(eps)(logits, targets).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # eps = 0 is the plain cross-entropy; smoothing must change the value
    plain = CrossEntropyLabelSmooth(0.0)(logits, targets).item()
    assert plain == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    assert abs(plain - got) > 1e-3


def test_label_smoothing_rejects_bad_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        CrossEntropyLabelSmooth(1.0)


def test_pairwise_euclidean():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    d = pairwise_euclidean(x)
    assert d[0, 1].item() == pytest.approx(5.0)
    assert d[1, 2].item() == pytest.approx(math.sqrt(4 + 16))
    assert d[0, 0].item() < 1e-5


def test_batch_hard_triplet_hand_computed():
    # 1-D features: identities a = {0, 1}, b = {3, 10}
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    y = torch.tensor([0, 0, 1, 1])
    margin = 0.3
    # anchor 0: hardest pos 1, hardest neg 3 -> relu(1 - 3 + .3) = 0
    # anchor 1: hardest pos 1, hardest neg 2 -> relu(1 - 2 + .3) = 0
    # anchor 3 (x=3): hardest pos 7, hardest neg 2 -> 5.3
    # anchor 10: hardest pos 7, hardest neg 9 -> 0
    loss, acc = TripletLoss(margin)(x, y)
    assert loss.item() == pytest.approx(5.3 / 4, rel=1e-5)
    assert acc.item() == pytest.approx(0.75)


def test_triplet_is_batch_hard_not_batch_all():
    # a batch-all loss would also count the easy positive; batch-hard uses only the farthest one
    x = torch.tensor([[0.0], [0.1], [2.0], [5.0], [5.1]])
    y = torch.tensor([0, 0, 0, 1, 1])
    loss, _ = TripletLoss(4.0)(x, y)
    d = pairwise_euclidean(x)
    same = y[:, None] == y[None, :]
    expected = torch.stack([
        torch.relu(d[i][same[i]].max() - d[i][~same[i]].min() + 4.0) for i in range(5)]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx((1.0 + 1.0 + 3.0 + 1.1 + 1.0) / 5, rel=1e-5)


def test_triplet_gradient_finite_with_duplicate_features():
    x = torch.zeros(4, 8, requires_grad=True)
    loss, _ = TripletLoss(0.3)(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_reid_loss_weights():
    torch.manual_seed(0)
    pooled, bn, logits = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 5)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    total, parts = ReidLoss(0.1, 0.3, id_weight=2.0, triplet_weight=0.5)((pooled, bn, logits), y)
    assert total.item() == pytest.approx(2.0 * parts["loss_id"].item() + 0.5 * parts["loss_tri"].item(), rel=1e-6)
    # the triplet term uses the pooled feature, not the BN one
    tri_pooled, _ = TripletLoss(0.3)(pooled, y)
    assert parts["loss_tri"].item() == pytest.approx(tri_pooled.item(), rel=1e-6)
