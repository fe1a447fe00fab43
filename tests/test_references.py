"""Reference-string files: a round trip, an independent replay (libCacheSim) and broken files."""

import pytest

from pregate.eviction import simulate_cache, unit_references
from pregate.references import ReferenceTraceError, read_references, write_references
from pregate.scheduler import SchedulerConfig
from pregate.sim import scheduled_steps
from tests.conftest import routed_trace

L, E = 4, 7
SCHED = SchedulerConfig(token_budget=16, max_running=4)


def test_reference_file_round_trip_and_independent_replay(tmp_path):
    steps = scheduled_steps(routed_trace(), SCHED)
    for unit in ("expert", "slice"):
        path = write_references(tmp_path / f"{unit}.txt", steps, L, E, unit)
        back = read_references(path)
        assert (back.unit, back.num_layers, back.num_experts) == (unit, L, E)
        assert len(back.accesses) == len(unit_references(steps, L, unit))
        ids = back.object_ids()
        ours = unit_references(steps, L, unit)
        assert [o if unit == "expert" else o[0] * E + o[1] for o in ours] == ids
        assert sorted({s for s, _, _ in back.accesses}) == list(range(len(steps)))
    lcs = pytest.importorskip("libcachesim")
    ids = read_references(tmp_path / "expert.txt").object_ids()
    cache, hits = lcs.LRU(3), 0
    for i, obj in enumerate(ids):
        req = lcs.Request()
        req.obj_id, req.obj_size, req.clock_time = obj, 1, i
        hits += bool(cache.get(req))
    assert hits == simulate_cache(ids, 3, "lru").hits


def test_bad_reference_files(tmp_path):
    with pytest.raises(ReferenceTraceError, match="does not exist"):
        read_references(tmp_path / "none.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\n")
    with pytest.raises(ReferenceTraceError, match="first line"):
        read_references(bad)
    bad.write_text("# pregate reference string v1\n# unit=expert num_layers=2 num_experts=3\n0 -1 x\n")
    with pytest.raises(ReferenceTraceError, match=":3:"):
        read_references(bad)
