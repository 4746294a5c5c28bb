"""The learning-rate schedule and the CGC term's weight, as properties over every step of many settings."""

from __future__ import annotations

import itertools
import math

import pytest

from cgc import Safeguards, TermConfig
from cgc.optimization import Schedule

#: steps per epoch, from one step (tiny fine-tuning sets) to many
STEPS = (1, 2, 3, 7, 187)


def every_step(schedule: Schedule, spe: int, fn: str = "lr_at") -> list[float]:
    return [getattr(schedule, fn)(e, s, spe) for e in range(schedule.epochs) for s in range(spe)]


@pytest.mark.parametrize("spe", STEPS)
@pytest.mark.parametrize("warmup", [0.0, 0.3, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("kind", ["cosine", "step", "constant"])
def test_warmup_rises_monotonically_to_the_rate_and_never_past_it(spe, warmup, kind):
    s = Schedule(0.05, 6, kind, warmup, step_epochs=2, gamma=0.5)
    lrs = every_step(s, spe)
    assert max(lrs) <= 0.05 and min(lrs) > 0
    warm = [lr for k, lr in enumerate(lrs) if k / spe < warmup]
    assert all(a < b or b == 0.05 for a, b in itertools.pairwise(warm))  # rising, capped at the rate
    if warm:
        # the step that ends the warm-up has the full rate; the first warm-up step a fraction of it
        assert warm[0] == pytest.approx(0.05 * min(1.0, (1 / spe) / warmup))
        assert max(warm) == pytest.approx(0.05 * min(1.0, math.ceil(warmup * spe) / spe / warmup))


def test_short_epochs_do_not_overshoot():
    """Half an epoch of warm-up with 1 or 3 steps per epoch (the earlier formula gave 2x and
    1.33x the rate there): one step per epoch is no warm-up, three rise 2/3 -> 1."""
    s = Schedule(0.05, 10, "cosine", 0.5)
    assert s.lr_at(0, 0, 1) == 0.05
    assert [s.lr_at(0, k, 3) for k in range(2)] == pytest.approx([0.05 * 2 / 3, 0.05])
    assert s.lr_at(0, 2, 3) < 0.05  # the cosine has begun


@pytest.mark.parametrize("spe", STEPS)
def test_continuous_at_the_end_of_warmup(spe):
    """The first step after the warm-up is within one step's cosine decay of the rate."""
    s = Schedule(0.05, 8, "cosine", 1.0)
    after = s.lr_at(1, 0, spe)
    one_step = 0.5 * 0.05 * (1 - math.cos(math.pi * (1 / spe) / 7))
    assert 0.05 - one_step - 1e-12 <= after <= 0.05


@pytest.mark.parametrize("spe", STEPS)
@pytest.mark.parametrize("warmup", [0.0, 0.5])
def test_cosine_decays_to_zero_at_the_end(spe, warmup):
    """Non-increasing after the warm-up, 0 at the end of the last epoch; the last step is within
    one step's decay of 0."""
    s = Schedule(0.05, 4, "cosine", warmup)
    lrs = every_step(s, spe)
    start = math.ceil(warmup * spe)
    tail = lrs[start:]
    assert all(a >= b for a, b in itertools.pairwise(tail))
    assert s.lr_at(4, 0, spe) == pytest.approx(0.0, abs=1e-15)
    span = 4 - warmup
    assert lrs[-1] <= 0.5 * 0.05 * (1 - math.cos(math.pi * (1 / spe) / span)) + 1e-15


def test_step_decay_at_the_right_epochs():
    s = Schedule(0.1, 9, "step", 0.0, step_epochs=3, gamma=0.1)
    by_epoch = [s.lr_at(e, 0, 5) for e in range(9)]
    assert by_epoch == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 3)
    assert all(s.lr_at(e, k, 5) == by_epoch[e] for e in range(9) for k in range(5))


def test_constant_is_constant_after_warmup():
    s = Schedule(0.1, 3, "constant", 1.0)
    assert every_step(s, 4)[4:] == [0.1] * 8


@pytest.mark.parametrize("spe", STEPS)
def test_lambda_ramp(spe):
    """lambda rises linearly by the position each step ends at, reaches lam exactly at the end of
    the ramp, and stays there; no ramp: lam from the first step."""
    guard = Safeguards(TermConfig(lam=2.0, lambda_warmup_epochs=3.0, term_gate=0.0))
    lams = [guard.weight(e + (k + 1) / spe) for e in range(5) for k in range(spe)]
    for k, lam in enumerate(lams):
        assert lam == pytest.approx(2.0 * min(1.0, (k + 1) / spe / 3.0))
    assert all(a <= b for a, b in itertools.pairwise(lams)) and lams[3 * spe - 1] == 2.0
    flat = Safeguards(TermConfig(lam=0.7, lambda_warmup_epochs=0.0, term_gate=0.0))
    assert {flat.weight(e + (k + 1) / spe) for e in range(2) for k in range(spe)} == {0.7}
