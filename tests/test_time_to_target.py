"""The time-to-target benchmark's lr sweep (bench/time_to_target.py): its walk over the grid
finds the grid's minimum of a unimodal loss from any start, probing fewer points than the grid."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
time_to_target = pytest.importorskip("time_to_target")


def _probed(losses: list[float], start: int) -> tuple[int, set[int]]:
    probes: set[int] = set()

    def loss(i: int) -> float:
        probes.add(i)
        return losses[i]

    return time_to_target.grid_walk(len(losses), start, loss), probes


@pytest.mark.parametrize("size", [1, 2, 5, 6])
def test_grid_walk_finds_the_minimum_of_a_unimodal_loss_from_every_start(size):
    for minimum in range(size):
        losses = [abs(i - minimum) + 0.1 * i for i in range(size)]  # unimodal, no ties
        for start in range(size):
            best, probes = _probed(losses, start)
            assert best == minimum, (size, minimum, start)
            assert len(probes) <= abs(start - minimum) + 3, (size, minimum, start, probes)


def test_grid_walk_stops_at_a_diverged_point_and_at_the_first_rise():
    # a diverged run is inf; the walk from the middle never probes past the first rise
    best, probes = _probed([2.7, 2.4, 1.84, 1.68, math.inf], 2)
    assert best == 3 and probes == {2, 3, 4}
    best, probes = _probed([1.5, 1.6, 1.9, 2.2, 2.5], 2)
    assert best == 0 and probes == {0, 1, 2, 3}
