"""The pre-gating router's native decode step (pregate.native_router): the torch step's logits within
float32 rounding (int8: within its bfloat16 roundings), the same bits for a token routed alone, in any
batch and at any thread count, training untouched, and native serving with it equal to one-by-one."""

import copy

import pytest
import torch

from pregate import native
from pregate.errors import PregateError
from pregate.native_router import attach_native_router, can_run_native_router
from pregate.packed import pack_router, serving_layout
from pregate.quantize import quantize_router
from pregate.router import PreGatingRouter, RouterConfig
from pregate.scheduler import SCHEDULING_POLICIES
from tests.conftest import build, tiny_hf_model, tiny_router
from tests.test_native import one_by_one_engine_tokens

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=str(native.unavailable_reason())
)

VOCAB = 500


def random_router(preset: str, head: str = "softmax", layers: int = 2, seed: int = 0) -> PreGatingRouter:
    """A router whose weights are large enough that every block moves the features (not the init's 0.02):
    unit-variance embeddings and products that keep the variance (std 1/sqrt(fan-in))."""
    torch.manual_seed(seed)
    cfg = RouterConfig.preset(preset, vocab_size=VOCAB, num_experts=5, n_layers=layers, head=head, top_k=2)
    router = PreGatingRouter(cfg).eval()
    with torch.no_grad():
        for name, p in router.named_parameters():
            std = 1.0 if p.dim() == 1 or name == "embed.weight" else p.shape[1] ** -0.5
            p.normal_(1.0 if p.dim() == 1 else 0.0, std)
    return router


def prefilled(router: PreGatingRouter, lengths: list[int], seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    caches = [router.new_cache(1) for _ in lengths]
    with torch.no_grad():
        for c, n in zip(caches, lengths):
            router.step(torch.randint(0, VOCAB, (1, n), generator=g), c)
    return caches


def decode_both(plain: PreGatingRouter, fast: PreGatingRouter, steps: int, lengths: list[int]):
    """(torch logits, native logits) [steps, B, E] routing the same random tokens after the same prompts."""
    caches_t, caches_n = prefilled(plain, lengths, 1), prefilled(fast, lengths, 1)
    g = torch.Generator().manual_seed(2)
    want, got = [], []
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.randint(0, VOCAB, (len(lengths),), generator=g)
            want.append(plain.step_tokens(tokens, caches_t))
            got.append(fast.step_tokens(tokens, caches_n))
    return torch.stack(want), torch.stack(got)


@pytest.mark.parametrize("head", ["softmax", "dselect"])
@pytest.mark.parametrize("preset", ["tiny", "readme"])
def test_native_step_is_the_torch_step_within_float32_rounding(preset, head):
    """Over many steps (the caches grow past their capacity), sequences of different lengths in one call.
    Compared as the distribution over experts: a DSelect-k router's logits are log q, where a near-zero q
    turns a rounding difference into a large one."""
    plain = random_router(preset, head)
    fast = attach_native_router(copy.deepcopy(plain))
    assert fast.native is not None
    want, got = decode_both(plain, fast, steps=40, lengths=[1, 7, 30])
    assert torch.allclose(got.softmax(-1), want.softmax(-1), rtol=0, atol=1e-5)
    if head == "softmax":
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(plain.route(got)[0], plain.route(want)[0])


# the int8 products' kernels: the machine's default, and AVX2's where that is AVX512-BF16's pair products
PAIRS = [None] + [False] * native.pair_dots()


@pytest.mark.parametrize("pairs", PAIRS)
def test_int8_native_step_is_the_torch_int8_step_within_its_bfloat16_rounding(pairs):
    """Both round each product's input and output to bfloat16; summed in another order, an element can land
    one bfloat16 step away, so the logits agree to about a percent and nearly every choice is the same."""
    plain = quantize_router(random_router("readme"))
    fast = attach_native_router(copy.deepcopy(plain), pairs)
    assert fast.native.int8
    want, got = decode_both(plain, fast, steps=20, lengths=[3, 12, 25, 40])
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
    same = (plain.route(got)[0] == plain.route(want)[0]).all(-1).float().mean()
    assert same >= 0.9


@pytest.mark.parametrize("quantize, pairs", [(None, None), *(("int8", p) for p in PAIRS)])
def test_a_token_gets_the_same_features_alone_in_any_batch_and_at_any_thread_count(quantize, pairs):
    router = random_router("readme")
    if quantize:
        quantize_router(router)
    fast = attach_native_router(router, pairs).native
    lengths = [4, 19, 1, 33, 8, 2, 5, 7, 12, 3, 1]  # more tokens than one of native.h's tiles holds
    caches = prefilled(router, lengths, 3)
    tokens = torch.randint(0, VOCAB, (len(lengths),), generator=torch.Generator().manual_seed(4))
    batched = fast.features(tokens, [c.clone() for c in caches])
    alone = [fast.features(tokens[i : i + 1], [caches[i].clone()]) for i in range(len(lengths))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = fast.features(tokens, [c.clone() for c in caches])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.cat(alone), batched)
    assert torch.equal(one_thread, batched)


def test_with_a_gradient_the_torch_step_runs():
    """Training code routes through torch (autograd), even on a router with the native step."""
    plain = random_router("tiny")
    fast = attach_native_router(copy.deepcopy(plain))
    caches_t, caches_n = prefilled(plain, [5], 5), prefilled(fast, [5], 5)
    tokens = torch.tensor([7])
    want = plain.step_tokens(tokens, caches_t)
    got = fast.step_tokens(tokens, caches_n)
    assert got.requires_grad and torch.equal(got, want)


def test_what_the_native_router_refuses():
    router = random_router("tiny")
    assert "float32" in can_run_native_router(copy.deepcopy(router).to(torch.bfloat16))
    with pytest.raises(PregateError, match="packed"):
        attach_native_router(pack_router(copy.deepcopy(router)))
    fast = attach_native_router(router)  # what the kernel would read out of bounds is refused before it
    with torch.no_grad(), pytest.raises(PregateError, match="token ids"):
        fast.step_tokens(torch.tensor([VOCAB]), [fast.new_cache(1)])
    with pytest.raises(PregateError, match="new_cache"):
        fast.native.features(
            torch.tensor([1]),
            [PreGatingRouter(RouterConfig.preset("tiny", vocab_size=VOCAB, num_experts=5)).new_cache(1)],
        )


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("policy", SCHEDULING_POLICIES)
def test_native_serving_with_the_native_router_equals_one_by_one_serving(policy, quantize):
    """`serving_layout(native=True)` gives the router its native step too; batched, chunked and cached
    serving then still gives each request the tokens it gets served alone."""
    hf = tiny_hf_model("llama", seed=4, hidden_size=64 if quantize else 48)
    model = build(hf, num_experts=3).to(torch.bfloat16).eval()
    served, router = serving_layout(model, tiny_router(), quantize, native=True)
    assert router.native is not None and router.native.int8 == bool(quantize)
    batched, alone = one_by_one_engine_tokens(served, router, policy)
    assert batched == alone
