"""The learning-rate schedule: a pure function of the step."""

from __future__ import annotations

import math

import pytest

from incr_cli.training.schedule import lr_factor, warmup_steps


def factors(total: int, warmup: int, schedule: str, min_lr_ratio: float = 0.0) -> list[float]:
    return [lr_factor(s, total_steps=total, warmup=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio)
            for s in range(total)]


def test_warmup_rises_linearly_to_the_peak_and_never_starts_at_zero():
    f = factors(10, 4, "constant")
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4:] == [1.0] * 6


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_starts_at_the_peak_and_falls_monotonically_towards_min_lr(schedule: str):
    f = factors(100, 10, schedule, min_lr_ratio=0.1)
    assert f[10] == pytest.approx(1.0)
    decay = f[10:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert 0.1 <= f[-1] < 0.13  # one step short of the floor
    assert min(f) >= 0.1


def test_cosine_is_half_way_at_the_middle_of_the_decay():
    f = factors(110, 10, "cosine")
    assert f[60] == pytest.approx(0.5)
    assert f[35] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_linear_decay_values():
    assert factors(5, 0, "linear") == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_warmup_steps_rounds_and_is_capped():
    assert warmup_steps(100, 0.06) == 6
    assert warmup_steps(3, 1.0) == 3
    assert warmup_steps(20, 0.0) == 0


def test_all_warmup_ends_at_the_peak():
    assert factors(4, 4, "cosine")[-1] == 1.0


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="train.schedule"):
        lr_factor(5, total_steps=10, warmup=0, schedule="step", min_lr_ratio=0.0)


def test_wsd_holds_the_peak_then_decays_linearly_over_its_last_steps():
    from incr_cli.training.schedule import decay_steps

    decay = decay_steps(20, 2, 0.25)
    assert decay == 5
    f = [lr_factor(s, total_steps=20, warmup=2, schedule="wsd", min_lr_ratio=0.0, decay=decay) for s in range(20)]
    assert f[:2] == pytest.approx([0.5, 1.0]) and f[2:15] == [1.0] * 13  # warm-up, then stable
    assert f[15:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])  # the last quarter decays
    assert decay_steps(10, 10, 0.2) == 1 and decay_steps(10, 0, 1.0) == 10  # within the steps after warm-up
