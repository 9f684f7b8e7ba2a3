import pytest
import torch

from rga.schedulers import DEFAULT_MILESTONES, WarmupMultiStepLR, lr_at


def test_default_milestones_are_80_to_360_every_40():
    assert list(DEFAULT_MILESTONES) == [80, 120, 160, 200, 240, 280, 320, 360]


@pytest.mark.parametrize("epoch,expected", [
    (0, 8e-6),
    (10, 8e-6 + (8e-4 - 8e-6) * 0.5),
    (19, 8e-6 + (8e-4 - 8e-6) * 19 / 20),
    (20, 8e-4),
    (79, 8e-4),
    (80, 4e-4),
    (119, 4e-4),
    (120, 2e-4),
    (359, 8e-4 / 2 ** 7),
    (360, 8e-4 / 2 ** 8),
    (599, 8e-4 / 2 ** 8),
])
def test_paper_schedule(epoch, expected):
    assert lr_at(epoch, 8e-4) == pytest.approx(expected, rel=1e-9)


def test_warmup_is_linear_and_monotone():
    lrs = [lr_at(e, 8e-4) for e in range(21)]
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(s == pytest.approx(steps[0], rel=1e-9) for s in steps)
    assert steps[0] > 0


def test_scheduler_sets_optimizer_lr_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=8e-4)
    s = WarmupMultiStepLR(opt)
    s.step(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(8e-6)
    s.step(85)
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-4)
    state = s.state_dict()
    opt2 = torch.optim.Adam([p], lr=1.0)
    s2 = WarmupMultiStepLR(opt2, warmup_epochs=3, milestones=[1], gamma=0.1)
    s2.load_state_dict(state)
    s2.step(130)
    assert opt2.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_no_warmup_and_custom_milestones():
    assert lr_at(0, 1.0, warmup_epochs=0, milestones=[2, 4], gamma=0.1) == 1.0
    assert lr_at(4, 1.0, warmup_epochs=0, milestones=[2, 4], gamma=0.1) == pytest.approx(0.01)


def test_bad_milestones_rejected():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="increasing"):
        WarmupMultiStepLR(opt, milestones=[5, 3])
