"""The claimed-task order of the int8 GEMVs (``moec.lower.schedules.int8_common.lane_task``)."""

import pytest

from moec.lower.schedules.int8_common import lane_task


@pytest.mark.parametrize("top_k, tiles, lanes", [(8, 16, 16), (8, 8, 16), (4, 8, 16), (3, 8, 16), (2, 9, 16)])
def test_expert_major_claims_visit_every_task_once_in_runs_of_one_expert(top_k, tiles, lanes):
    """Each lane's scan is a permutation of the tile-major task ids (task ``t``: routed row ``t % top_k``,
    row tile ``t // top_k``); expert-major, its consecutive claims are consecutive tiles of one routed row
    except where it passes to the next row; tile-major (no ``tiles``) it is the plain wrap-around scan."""
    ntask = top_k * tiles
    for cl in range(lanes):
        em = [lane_task(cl, j, ntask, lanes, tiles) for j in range(ntask)]
        tm = [lane_task(cl, j, ntask, lanes) for j in range(ntask)]
        assert sorted(em) == sorted(tm) == list(range(ntask))
        assert tm == [(cl * ntask // lanes + j) % ntask for j in range(ntask)]
        rows, tile_of = [t % top_k for t in em], [t // top_k for t in em]
        for a in range(ntask - 1):
            if rows[a + 1] == rows[a]:
                assert tile_of[a + 1] == tile_of[a] + 1
            else:
                assert tile_of[a] == tiles - 1 and tile_of[a + 1] == 0
        assert sum(rows[a + 1] != rows[a] for a in range(ntask - 1)) <= top_k
