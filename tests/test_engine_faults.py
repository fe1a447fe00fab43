"""The engine survives faults: an error inside a step or while adding a request fails only those requests."""

import pytest
import torch

from pregate.engine import Engine, SamplingParams
from pregate.scheduler import SchedulerConfig
from tests.conftest import build, prompts, reference_greedy, tiny_hf_model, tiny_router

POISON = 13  # a token id whose presence in a step makes the injected fault fire


@pytest.fixture
def faulty_engine():
    """A real engine whose model raises inside forward whenever a step contains the POISON token."""
    moe, router = build(tiny_hf_model(seed=4), num_experts=3), tiny_router()
    engine = Engine(moe, router=router, scheduler_config=SchedulerConfig(token_budget=64))
    real = engine.model.forward_packed

    def forward_packed(input_ids, *args, **kwargs):
        if (input_ids == POISON).any():
            raise RuntimeError("injected fault")
        return real(input_ids, *args, **kwargs)

    engine.model.forward_packed = forward_packed
    return engine, moe, router


def clean_prompts(n):
    return [[t for t in p if t != POISON] or [5] for p in prompts(n)]


def test_a_fault_in_a_step_fails_that_steps_requests_and_the_engine_goes_on(faulty_engine):
    engine, moe, router = faulty_engine
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    good = clean_prompts(3)
    poisoned = engine.add_request([5, POISON, 7], params)
    neighbour = engine.add_request(good[0], params)  # shares the poisoned step
    events = engine.step()
    assert {ev.request_id for ev in events} == {poisoned, neighbour}
    assert all(ev.finished and ev.finish_reason == "error" and ev.internal_error for ev in events)
    assert "injected fault" in engine.failed[poisoned] and "injected fault" in engine.failed[neighbour]
    assert engine.scheduler.kv_used_tokens == 0 and not engine.has_work()  # their KV is free
    assert engine.result(poisoned).finish_reason == "error"
    outs = engine.generate(good[1:], params)  # later requests are served as if nothing happened
    assert [o.token_ids for o in outs] == [reference_greedy(moe, router, p, 4) for p in good[1:]]


def test_a_fault_while_adding_leaves_no_trace(faulty_engine):
    engine, moe, router = faulty_engine
    real = engine.router.step

    def step(x, cache):
        if (x == 11).any():
            raise ValueError("injected admission fault")
        return real(x, cache)

    engine.router.step = step
    with pytest.raises(ValueError, match="injected admission fault"):
        engine.add_request([4, 11, 6], SamplingParams(max_tokens=3))
    assert not engine.has_work() and engine.scheduler.kv_used_tokens == 0
    p = clean_prompts(2)[1]
    p = [t for t in p if t != 11] or [5]
    out = engine.generate([p], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.token_ids == reference_greedy(moe, router, p, 3)


def test_fail_all_ends_everything_and_the_engine_serves_again(faulty_engine):
    engine, moe, router = faulty_engine
    seen = []
    good = clean_prompts(2)
    for p in good:
        engine.add_request(p, SamplingParams(max_tokens=5), callback=seen.append)
    engine.step()
    engine.fail_all("test")
    assert not engine.has_work() and engine.scheduler.kv_used_tokens == 0
    assert sum(ev.finished and ev.finish_reason == "error" for ev in seen) == 2
    out = engine.generate([good[0]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.token_ids == reference_greedy(moe, router, good[0], 3)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ([1, None, 3], "integers"),
        ([1, "a"], "integers"),
        ([1.5, 2], "integers"),
        ([True], "integers"),
        ([[1, 2], [3]], "integers"),
        ([2**70], "vocabulary"),
    ],
)
def test_malformed_token_lists_are_request_errors(faulty_engine, prompt, match):
    from pregate.engine import RequestError

    engine, _, _ = faulty_engine
    with pytest.raises(RequestError, match=match):
        engine.add_request(prompt)
    assert not engine.has_work()


@pytest.mark.parametrize("temperature, top_p", [(1e-45, 1.0), (1e-30, 1e-45), (1.0, 1e-46), (1e300, 1.0)])
def test_sampling_survives_extreme_but_valid_parameters(temperature, top_p):
    from pregate.engine import sample_token

    logits = torch.randn(97) * 10
    g = torch.Generator().manual_seed(0)
    tok = sample_token(logits, SamplingParams(temperature=temperature, top_p=top_p), g)
    assert 0 <= tok < 97
    if temperature < 1e-20 or top_p < 1e-20:  # that small a temperature or nucleus is greedy
        assert tok == int(logits.argmax())


def test_largest_seed_is_accepted_and_one_more_is_refused():
    from pregate.engine import RequestError

    SamplingParams(temperature=1.0, seed=2**64 - 1)
    with pytest.raises(RequestError, match="seed"):
        SamplingParams(temperature=1.0, seed=2**64)
