"""Cohort sampling: counts, fractions, Poisson, determinism."""

from __future__ import annotations

import pytest

from shoal.algorithms.cohort import cohort
from shoal.errors import ConfigError

POP = [f"c{i:03d}" for i in range(100)]


def test_count_fraction_all():
    assert len(cohort(10).sample(POP, 0, 1)) == 10
    assert len(cohort(0.29).sample(POP, 0, 1)) == 29
    assert cohort().sample(POP, 0, 1) == POP
    assert len(cohort(500).sample(POP, 0, 1)) == 100


def test_same_seed_and_round_same_cohort_in_population_order():
    a = cohort(10).sample(POP, 1, 5)
    assert a == cohort(10).sample(POP, 1, 5) == sorted(a)
    assert a != cohort(10).sample(POP, 1, 6)
    assert a != cohort(10).sample(POP, 2, 5)


def test_poisson_inclusion_rate():
    sizes = [len(cohort(0.1, "poisson").sample(POP, 0, r)) for r in range(1, 401)]
    assert 9.0 < sum(sizes) / len(sizes) < 11.0
    assert len(set(sizes)) > 3


@pytest.mark.parametrize("args, msg", [
    ((0,), "cohort: a count must be >= 1 (got 0)."),
    ((1.5,), "cohort: a fraction must be in (0, 1] (got 1.5)."),
    ((10, "poisson"), "cohort: poisson sampling needs a fraction (inclusion probability), "
                      "got the count 10; pass e.g. 0.01 instead."),
    ((0.1, "stratified"), "cohort: mode must be 'fixed' or 'poisson' (got 'stratified')."),
])
def test_bad_cohorts(args, msg):
    with pytest.raises(ConfigError) as e:
        cohort(*args)
    assert str(e.value) == msg
