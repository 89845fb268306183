"""A non-finite gradient on one rank of a live gloo group stops (or skips the step on)
every rank together, before the weights change."""
from __future__ import annotations

import pytest
from nonfinite_cases import (
    one_rank_nan_gradient_is_skipped_by_every_rank,
    one_rank_nan_gradient_stops_every_rank,
)
from spawn import run_ranks


@pytest.mark.parametrize('bad_rank', [1])
def test_a_nan_gradient_on_one_rank_stops_every_rank_before_the_step(bad_rank):
    run_ranks(2, one_rank_nan_gradient_stops_every_rank, bad_rank)


def test_skip_mode_skips_the_step_on_every_rank_together():
    run_ranks(2, one_rank_nan_gradient_is_skipped_by_every_rank, 0)
