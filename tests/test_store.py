"""The tiered expert store on tiny random MoEs (float32, CPU): exactness, the replay, bad input."""

import os
import random
import subprocess
import sys
import time

import pytest
import torch

from pregate.cache_bench import ReplayRequest, replay_teacher_forced
from pregate.moe import Routing, Segment, save_moe
from pregate.scheduler import SchedulerConfig
from pregate.sim import CostModel, SimConfig, scheduled_steps, simulate
from pregate.store import ExpertStore, StoreConfig, StoreError, _numpy, _transposer
from pregate.workload import WorkloadRequest
from tests.conftest import bookkeeping_size, build, tiny_hf_model

E = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: intra-op threads only add contention on a shared 2-core machine (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    moe = build(tiny_hf_model(seed=2), num_experts=E, shared=16)
    path = tmp_path_factory.mktemp("moe")
    save_moe(moe, path)
    return moe, path


def steps_of(seed=0, n=6, t=7):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 97, (t,), generator=g), torch.randint(0, E, (t,), generator=g)) for _ in range(n)
    ]


@pytest.mark.parametrize("unit,k", [("expert", 1), ("expert", 2), ("expert", 3), ("slice", 2), ("slice", 5)])
@pytest.mark.parametrize("policy", ["belady", "lru", "random", "lfu"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_store_backed_forward_is_bit_exact(moe_dir, unit, k, policy, prefetch):
    moe, path = moe_dir
    steps = steps_of()
    with ExpertStore(
        path, StoreConfig(capacity=k, unit=unit, policy=policy, prefetch=prefetch, depth=2, timeout_s=10)
    ) as store:
        store.plan(sorted(set(e.tolist())) for _, e in steps)
        for ids, experts in steps:
            want = moe.forward_packed(ids, [Segment(len(ids))], Routing.top1(experts))
            got = moe.forward_packed(ids, [Segment(len(ids))], Routing.top1(experts), expert_source=store)
            assert torch.equal(got, want)
        s = store.stats
    assert s.hits + s.misses > 0 and s.bytes_loaded == s.slice_loads * store.slice_bytes
    assert s.misses >= (k if unit == "expert" else 0) or s.misses == len(
        {int(e) for _, x in steps for e in x}
    )


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_bfloat16_store_is_bit_exact(moe_dir, tmp_path, prefetch):
    """bfloat16 slices load through the loader's 2-byte transpose (native where it builds)."""
    moe = build(tiny_hf_model(seed=2), num_experts=E, shared=16).to(torch.bfloat16)
    save_moe(moe, tmp_path)
    steps = steps_of(seed=1)
    with ExpertStore(tmp_path, StoreConfig(capacity=2, prefetch=prefetch, timeout_s=10)) as store:
        store.plan(sorted(set(e.tolist())) for _, e in steps)
        for ids, experts in steps:
            want = moe.forward_packed(ids, [Segment(len(ids))], Routing.top1(experts))
            got = moe.forward_packed(ids, [Segment(len(ids))], Routing.top1(experts), expert_source=store)
            assert torch.equal(got, want)
        assert store.stats.misses > 0


def routed_requests(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, o = int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(2, 8, (1,), generator=g))
        pe = torch.randint(0, E, (p,), generator=g).tolist()
        oe = torch.randint(0, E, (o,), generator=g).tolist()
        trace = WorkloadRequest(f"r{i}", "", o, prompt_experts=pe, output_experts=oe)
        out.append(
            ReplayRequest(
                trace,
                torch.randint(0, 97, (p,), generator=g).tolist(),
                torch.randint(0, 97, (o,), generator=g).tolist(),
            )
        )
    return out


def test_prefetch_never_changes_generated_tokens_and_sim_sees_the_same_cache(moe_dir):
    moe, path = moe_dir
    reqs = routed_requests()
    cfg = SchedulerConfig(token_budget=8, max_running=3)
    base = replay_teacher_forced(moe, reqs, cfg)
    steps = scheduled_steps([r.trace for r in reqs], cfg)
    assert len(base["steps"]) == len(steps)
    for prefetch in (False, True):
        with ExpertStore(path, StoreConfig(capacity=2, prefetch=prefetch, timeout_s=10)) as store:
            store.plan(steps)
            got = replay_teacher_forced(moe, reqs, cfg, store)
            stats = store.stats
        assert got["tokens"] == base["tokens"]
        # the simulator drives the same Residency/ExpertCache: identical cache decisions
        cost = CostModel(moe.config.num_layers, store.slice_bytes, 1e9, 1e-6, 1e-6)
        sim = simulate([r.trace for r in reqs], cost, SimConfig(capacity=2, prefetch=prefetch, scheduler=cfg))
        assert sim.steps == steps
        assert (sim.cache.hits, sim.cache.misses, sim.cache.prefetches) == (
            stats.hits,
            stats.misses,
            stats.prefetches,
        )


def test_bandwidth_cap_is_honoured(moe_dir):
    _, path = moe_dir
    with ExpertStore(path, StoreConfig(capacity=1, unit="slice")) as probe:
        bw = probe.slice_bytes / 0.01  # 10 ms per slice
    with ExpertStore(path, StoreConfig(capacity=2, unit="slice", bandwidth=bw)) as store:
        t0 = time.perf_counter()
        for layer in range(2):
            store.begin_layer(layer, [0, 1])
            store.fetch(layer, 0)
            store.fetch(layer, 1)
        assert time.perf_counter() - t0 >= 4 * 0.01
        assert store.stats.slice_loads == 4 and store.stats.stall_s >= 0.04


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(capacity=0), "capacity=0"),
        (dict(capacity=E + 1), "exceeds"),
        (dict(capacity=1, bandwidth=0), "bandwidth=0"),
        (dict(capacity=1, bandwidth=-5.0), "bandwidth=-5.0"),
        (dict(capacity=1, policy="mru"), "policy='mru'"),
        (dict(capacity=1, unit="layer"), "unit='layer'"),
        (dict(capacity_bytes=10), "holds no expert"),
        (dict(), "exactly one"),
    ],
)
def test_bad_config_is_a_clear_error(moe_dir, kwargs, match):
    _, path = moe_dir
    with pytest.raises(StoreError, match=match):
        ExpertStore(path, StoreConfig(**kwargs))


def test_missing_and_truncated_checkpoints(moe_dir, tmp_path):
    _, path = moe_dir
    with pytest.raises(StoreError, match="does not exist"):
        ExpertStore(tmp_path / "nothing", StoreConfig(capacity=1))
    data = (path / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated"):
        ExpertStore(cut, StoreConfig(capacity=1))


def test_file_truncated_under_a_running_loader_raises_not_hangs(moe_dir, tmp_path):
    _, path = moe_dir
    copy = tmp_path / "model.safetensors"
    copy.write_bytes((path / "model.safetensors").read_bytes())
    with ExpertStore(copy, StoreConfig(capacity=2, prefetch=True, timeout_s=5)) as store:
        os.truncate(copy, 1000)
        t0 = time.perf_counter()
        with pytest.raises(StoreError):
            for layer in range(store.num_layers):
                store.begin_layer(layer, [0, 1])
                store.fetch(layer, 0)
                store.fetch(layer, 1)
        assert time.perf_counter() - t0 < 5


def test_protocol_misuse(moe_dir):
    _, path = moe_dir
    with ExpertStore(path, StoreConfig(capacity=2)) as store:
        with pytest.raises(StoreError, match="not announced"):
            store.fetch(0, 1)
        store.plan([[0, 1]])
        with pytest.raises(StoreError, match="plan says"):
            store.begin_layer(0, [2])


@pytest.mark.parametrize("shape", [(1, 5), (33, 70), (960, 720)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_loaders_transpose_equals_numpys(shape, dtype):
    """The tiled native loop (numpy's copy without the native library): edges of partial tiles too."""
    src = torch.randn(shape).to(dtype)
    dst = torch.empty(shape[::-1], dtype=dtype)
    _transposer()(_numpy(src), _numpy(dst))
    assert torch.equal(dst, src.T)


def test_runtime_modules_never_import_the_simulator():
    code = (
        "import sys, pregate.store, pregate.engine, pregate.server, pregate.launch\n"
        "sim = ('pregate.sim', 'pregate.references', 'pregate.cache_bench')\n"
        "bad = [m for m in sim if m in sys.modules]\n"
        "assert not bad, f'runtime imports {bad}'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("prefetch", [False, True])
def test_long_serving_run_keeps_the_store_bookkeeping_bounded(moe_dir, prefetch):
    """As `serve --resident-experts` drives it: each step planned as it is scheduled, then run. Every
    container of the store and its residency, counted entry by entry, stops growing."""
    _, path = moe_dir
    rng = random.Random(0)
    sizes = []
    with ExpertStore(path, StoreConfig(capacity=2, prefetch=prefetch, timeout_s=10)) as store:
        for i in range(2400):
            experts = sorted(rng.sample(range(E), 2))
            store.plan([experts])
            for layer in range(store.num_layers):
                store.begin_layer(layer, experts)
                for e in experts:
                    store.fetch(layer, e)
            if i % 20 == 0:
                sizes.append(bookkeeping_size(store))
        assert store.stats.misses > 500
    n = len(sizes)
    early = max(sizes[n // 4 : n // 2])
    late = max(sizes[3 * n // 4 :])
    assert late <= 1.1 * early, (early, late)


@pytest.mark.gpu
def test_gpu_store_matches_cpu(moe_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    moe, path = moe_dir
    gpu = moe.to("cuda")
    with ExpertStore(path, StoreConfig(capacity=2, prefetch=True, device="cuda")) as store:
        for ids, experts in steps_of():
            ids, experts = ids.cuda(), experts.cuda()
            want = gpu.forward_packed(ids, [Segment(len(ids))], Routing.top1(experts))
            got = gpu.forward_packed(ids, [Segment(len(ids))], Routing.top1(experts), expert_source=store)
            assert torch.equal(got, want)
