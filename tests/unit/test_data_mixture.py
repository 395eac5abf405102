"""Mixture arithmetic: rates, per-epoch counts, and the slot -> example map."""

import collections

import numpy as np
import pytest

from mta_jax import data
from mta_jax.data import mixture

SIZES = {"a": 900, "b": 90, "c": 10}


def test_rates():
    assert data.mixture_rates(SIZES, "proportional") == pytest.approx(
        {"a": 0.9, "b": 0.09, "c": 0.01}
    )
    assert data.mixture_rates(SIZES, "equal") == pytest.approx({t: 1 / 3 for t in SIZES})
    assert data.mixture_rates(SIZES, "temperature", temperature=1.0) == pytest.approx(
        data.mixture_rates(SIZES, "proportional")
    )
    sqrt = np.sqrt([900, 90, 10])
    assert list(data.mixture_rates(SIZES, "temperature", temperature=2.0).values()) == (
        pytest.approx(list(sqrt / sqrt.sum()))
    )
    assert data.mixture_rates(SIZES, "proportional", cap=90) == pytest.approx(
        {"a": 90 / 190, "b": 90 / 190, "c": 10 / 190}
    )
    huge = data.mixture_rates({"a": 10**9, "b": 1}, "temperature", temperature=0.01)
    assert huge["a"] == pytest.approx(1.0) and np.isfinite(huge["b"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="zipf"), "config.data.mixture is 'zipf'"),
        (dict(kind="temperature", temperature=0.0), "mixture_temperature must be > 0"),
        (dict(kind="proportional", cap=-1), "mixture_cap must be >= 0"),
    ],
)
def test_bad_mixture_settings(kwargs, match):
    with pytest.raises(data.DataError, match=match):
        data.mixture_rates(SIZES, **kwargs)
    with pytest.raises(data.DataError, match="at least one example"):
        data.mixture_rates({"a": 0}, "equal")


def test_epoch_counts_sum_exactly_and_keep_every_task():
    counts = data.epoch_counts({"a": 0.5, "b": 0.3, "c": 0.2}, 11)
    assert counts == {"a": 6, "b": 3, "c": 2}  # 5.5, 3.3, 2.2: the .5 remainder wins
    assert data.epoch_counts({"a": 0.999, "b": 0.001}, 100) == {"a": 99, "b": 1}


def test_index_walks_each_task_through_all_its_examples():
    # Task 0 (rows 0-9) is down-sampled to 4 slots an epoch, task 1 (rows 10-12) up-sampled to 6.
    index = mixture.MixtureIndex([0, 10], [10, 3], [4, 6], seed=0)
    rows = [index.row(epoch, slot) for epoch in range(5) for slot in range(10)]
    task0 = [r for r in rows if r < 10]
    assert sorted(task0[:10]) == list(range(10)) and sorted(task0[10:20]) == list(range(10))
    task1 = collections.Counter(r for r in rows if r >= 10)
    assert task1 == {10: 10, 11: 10, 12: 10}
    again = mixture.MixtureIndex([0, 10], [10, 3], [4, 6], seed=0)
    assert [again.row(e, s) for e in range(5) for s in range(10)] == rows
