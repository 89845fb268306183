"""A rank that goes silent is named by every survivor within the stall time."""
from __future__ import annotations

import pytest
from heartbeat_cases import every_rank_alive_is_never_lost, one_rank_goes_silent
from spawn import run_ranks


@pytest.mark.parametrize('world,silent', [(2, 1), (3, 0)])
def test_the_survivors_name_the_silent_rank_within_the_stall_time(world, silent):
    run_ranks(world, one_rank_goes_silent, silent)


def test_ranks_busy_computing_are_not_reported():
    run_ranks(2, every_rank_alive_is_never_lost)
