"""Schedules are pure functions of the step, with exact values."""

from __future__ import annotations

import math

import pytest
from conftest import SmallCNN

import dst_prune
from dst_prune.schedules import UpdateSchedule, cubic_sparsity, decayed_fraction


def test_cosine_linear_and_constant_decay_values():
    assert decayed_fraction(0.3, 0, 100, "cosine") == pytest.approx(0.3)
    assert decayed_fraction(0.3, 50, 100, "cosine") == pytest.approx(0.15)
    assert decayed_fraction(0.3, 25, 100, "cosine") == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert decayed_fraction(0.3, 100, 100, "cosine") == pytest.approx(0.0)
    assert decayed_fraction(0.3, 150, 100, "cosine") == pytest.approx(0.0)
    assert decayed_fraction(0.3, 25, 100, "linear") == pytest.approx(0.225)
    assert decayed_fraction(0.3, 99, 100, "constant") == 0.3
    assert decayed_fraction(0.3, 99, None, "cosine") == 0.3


def test_cubic_sparsity_values():
    assert cubic_sparsity(0, 0, 100, 0.0, 0.9) == 0.0
    assert cubic_sparsity(50, 0, 100, 0.0, 0.9) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert cubic_sparsity(60, 10, 110, 0.5, 0.9) == pytest.approx(0.9 - 0.4 * 0.5 ** 3)
    assert cubic_sparsity(100, 0, 100, 0.0, 0.9) == 0.9
    assert cubic_sparsity(500, 0, 100, 0.0, 0.9) == 0.9


def test_update_schedule_doubles_its_period_and_stops():
    schedule = UpdateSchedule(update_every=2, stop_step=20, double_at=[9, 5])
    assert [s for s in range(1, 30) if schedule.is_update_step(s)] == [2, 4, 8, 16]
    assert schedule.period(4) == 2 and schedule.period(5) == 4 and schedule.period(9) == 8


@pytest.mark.parametrize(("method", "stop"), [("rigl", 75), ("gmp", 75), ("granet", 75), ("snfs", 100)])
def test_default_stop_fractions(method, stop):
    dst = dst_prune.apply(SmallCNN(), sparsity=0.8, method=method, total_steps=100, update_every=5)
    assert dst.schedule.stop_step == stop


def test_stop_fraction_and_stop_step_override_the_default():
    assert dst_prune.apply(SmallCNN(), sparsity=0.8, method="rigl", total_steps=100,
                           stop_fraction=0.5).schedule.stop_step == 50
    assert dst_prune.apply(SmallCNN(), sparsity=0.8, method="rigl", total_steps=100,
                           stop_step=30).schedule.stop_step == 30
    assert dst_prune.apply(SmallCNN(), sparsity=0.8, method="dsr").schedule.stop_step is None


@pytest.mark.parametrize(("method", "kwargs"), [("rigl", {}), ("snfs", {}), ("gmp", {}), ("granet", {}),
                                                ("set", {"decay": "cosine"})])
def test_methods_that_need_the_length_of_training_say_so(method, kwargs):
    model = SmallCNN()
    with pytest.raises(dst_prune.DSTError, match=f"method='{method}' needs the length of training for its "
                                                 f"schedule: pass total_steps="):
        dst_prune.apply(model, sparsity=0.8, method=method, **kwargs)
    assert not dst_prune.is_sparse(model)


def test_rigl_updates_every_period_until_t_end():
    dst = dst_prune.apply(SmallCNN(), sparsity=0.8, method="rigl", total_steps=1000, update_every=100)
    assert [s for s in range(1, 1001) if dst.algorithm.is_update_step(s)] == [100, 200, 300, 400, 500, 600, 700]


def test_gmp_prunes_every_period_and_at_its_end():
    dst = dst_prune.apply(SmallCNN(), sparsity=0.8, method="gmp", total_steps=100, update_every=10, begin_step=5)
    assert [s for s in range(1, 101) if dst.algorithm.is_update_step(s)] == [15, 25, 35, 45, 55, 65, 75]
    dst = dst_prune.apply(SmallCNN(), sparsity=0.8, method="gmp", total_steps=100, update_every=20)
    assert [s for s in range(1, 101) if dst.algorithm.is_update_step(s)] == [20, 40, 60, 75]


def test_bad_schedule_arguments():
    with pytest.raises(dst_prune.DSTError, match=r"stop_fraction must be a number in \(0, 1\]; received 1.5"):
        dst_prune.apply(SmallCNN(), sparsity=0.8, method="rigl", total_steps=100, stop_fraction=1.5)
    with pytest.raises(dst_prune.DSTError, match="decay='exp' is unknown; valid choices: cosine, linear, constant"):
        dst_prune.apply(SmallCNN(), sparsity=0.8, method="rigl", total_steps=100, decay="exp")
    with pytest.raises(dst_prune.DSTError, match="prunes between begin_step=80 and the stop step 75"):
        dst_prune.apply(SmallCNN(), sparsity=0.8, method="gmp", total_steps=100, begin_step=80)
    with pytest.raises(dst_prune.DSTError, match=r"initial_sparsity=0\.9 is above sparsity=0\.8"):
        dst_prune.apply(SmallCNN(), sparsity=0.8, method="gmp", total_steps=100, initial_sparsity=0.9)
