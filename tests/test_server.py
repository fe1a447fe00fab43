"""The HTTP server, end to end: a real uvicorn server on loopback and the real `openai` client."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import uvicorn
from transformers import AutoTokenizer

from pregate.engine import Engine, SamplingParams
from pregate.moe import load_moe
from pregate.refactor import RefactorConfig, refactor
from pregate.router import PreGatingRouter, RouterConfig
from pregate.server import build_app
from tests.conftest import free_port


@pytest.fixture
def served(tiny_checkpoint, tmp_path):
    """(openai client, a second engine over the same model and router for reference answers)."""
    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32")
    moe_dir = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    model = load_moe(moe_dir)
    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    torch.manual_seed(0)
    router = PreGatingRouter(
        RouterConfig.preset("tiny", vocab_size=model.config.base["vocab_size"], num_experts=2)
    ).eval()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(Engine(model, tokenizer, router), "tiny-moe"),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start"
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60
    )
    yield client, Engine(model, tokenizer, router)
    server.should_exit = True
    thread.join(timeout=10)


PROMPTS = ["the quick brown", "def f3(x):", "lazy dog jumps", "return x *"]


def test_completion_equals_offline_generation(served):
    client, engine = served
    want = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8))[0]
    got = client.completions.create(model="tiny-moe", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.choices[0].finish_reason in ("length", "stop")


def test_streaming_gives_the_same_text(served):
    client, _ = served
    full = (
        client.completions.create(model="tiny-moe", prompt=PROMPTS[1], max_tokens=10, temperature=0)
        .choices[0]
        .text
    )
    chunks = list(
        client.completions.create(
            model="tiny-moe", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_requests_equal_one_by_one(served):
    client, engine = served
    want = [o.text for o in engine.generate(PROMPTS, SamplingParams(max_tokens=6))]
    with ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(
                lambda p: (
                    client.completions.create(model="tiny-moe", prompt=p, max_tokens=6, temperature=0)
                    .choices[0]
                    .text
                ),
                PROMPTS,
            )
        )
    assert got == want


def test_chat_streaming(served):
    client, _ = served
    messages = [{"role": "user", "content": "the quick brown fox"}]
    full = (
        client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=5, temperature=0)
        .choices[0]
        .message.content
    )
    parts = client.chat.completions.create(
        model="tiny-moe", messages=messages, max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in parts) == full


def test_bad_requests_fail_alone(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-moe", prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="empty prompt"):
        client.completions.create(model="tiny-moe", prompt="", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny-moe", prompt="abc", max_tokens=0)
    assert (
        client.completions.create(model="tiny-moe", prompt="abc", max_tokens=2, temperature=0).choices[0].text
        is not None
    )
    assert [m.id for m in client.models.list().data] == ["tiny-moe"]


OFFLOADED = ["--resident-experts", "1", "--prefetch"]


@pytest.mark.parametrize(
    "offload",
    [pytest.param([], id="resident"), pytest.param(OFFLOADED, id="offloaded", marks=pytest.mark.subprocess)],
)
def test_pregate_serve_command_answers_the_openai_client(tiny_checkpoint, tmp_path, offload):
    """`pregate serve` as a user runs it: a subprocess on a `pregate train` output, queried over HTTP;
    with 1 of 2 experts resident (the other read from the checkpoint) the answer is the same.

    The resident case is left unmarked: it is the one subprocess-server test kept in `make test` (the
    quickest end-to-end check of `pregate serve`). The offloaded case is marked `subprocess`."""
    from pregate.router import load_router

    trained, proc, port, client = _serve_trained(tiny_checkpoint, tmp_path, *offload)
    try:
        assert [m.id for m in client.models.list().data] == ["tiny"]
        got = (
            client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0)
            .choices[0]
            .text
        )
        engine = Engine(load_moe(trained), AutoTokenizer.from_pretrained(trained), load_router(trained))
        assert got == engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6))[0].text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _serve_trained(tiny_checkpoint, tmp_path, *flags):
    """Refactor and train a tiny MoE, start `pregate serve` on it as a subprocess and wait until it
    answers; returns (trained dir, process, port, openai client)."""
    import subprocess
    import sys

    from pregate.train import TrainConfig, train

    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32")
    moe_dir = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    trained = train(
        moe_dir, tmp_path / "trained", TrainConfig.preset("tiny", train_control=False), progress=False
    )
    port = free_port()
    argv = ["serve", str(trained), "--port", str(port), "--name", "tiny", "--dtype", "float32", *flags]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pregate.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30
    )
    deadline = time.time() + 60
    while True:
        try:
            client.models.list()
            return trained, proc, port, client
        except openai.APIConnectionError:
            if proc.poll() is not None or time.time() >= deadline:
                proc.kill()
                raise AssertionError(proc.stdout.read() if proc.poll() is not None else "no answer") from None
            time.sleep(0.2)


def test_pregate_serve_refuses_a_model_without_router(tiny_checkpoint, tmp_path, capsys):
    from pregate.cli import main

    moe_dir = refactor(
        str(tiny_checkpoint),
        tmp_path / "moe",
        RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32"),
    )
    assert main(["serve", str(moe_dir)]) == 2
    err = capsys.readouterr().err
    assert "no trained router" in err and "pregate train" in err and "Traceback" not in err


def test_broken_json_body_is_a_400(served):
    client, _ = served
    import httpx

    r = httpx.post(
        f"{client.base_url}completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def reference_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits over ids, no cache: full recompute of backbone and router [L, V]."""
    from pregate.moe import Routing

    with torch.no_grad():
        x = torch.tensor([ids])
        e, w = engine.router.route(engine.router(x))
        return torch.log_softmax(engine.model(x, Routing(e[0], w[0].float()))[0].float(), dim=-1)


def test_completion_logprobs_and_echo_equal_log_softmax_of_the_model(served):
    client, engine = served
    prompt = engine.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    got = client.completions.create(
        model="tiny-moe", prompt=prompt, max_tokens=5, temperature=0, logprobs=3, echo=True
    ).choices[0]
    lp = got.logprobs
    n_prompt = len(prompt)
    assert got.text.startswith(PROMPTS[0]) and len(lp.tokens) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    full = prompt + engine.generate([prompt], SamplingParams(max_tokens=5))[0].token_ids
    ref = reference_logprobs(engine, full)
    want = [float(ref[i - 1, full[i]]) for i in range(1, len(full))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i in range(1, len(full)):  # the 3 most likely tokens and their logprobs (+ the chosen one)
        top3 = ref[i - 1].topk(3)
        alts: dict[str, float] = {}
        for t, v in zip(top3.indices.tolist(), top3.values.tolist()):
            alts.setdefault(engine.tokenizer.decode([t]), v)  # tokens with the same text: the likeliest
        for text, v in alts.items():
            assert lp.top_logprobs[i][text] == pytest.approx(v, abs=1e-4)
    assert (
        lp.text_offset[0] == 0
        and lp.text_offset == sorted(lp.text_offset)
        and lp.text_offset[n_prompt] == len(PROMPTS[0])
    )


def test_echo_with_max_tokens_0_scores_the_prompt_as_lm_eval_asks(served):
    client, engine = served
    prompt = engine.tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    got = client.completions.create(
        model="tiny-moe", prompt=[prompt, prompt[:3]], max_tokens=0, temperature=0, logprobs=1, echo=True
    )
    ref = reference_logprobs(engine, prompt)
    first, second = sorted(got.choices, key=lambda c: c.index)
    assert first.text == PROMPTS[2] and first.logprobs.tokens == [
        engine.tokenizer.decode([t]) for t in prompt
    ]
    assert first.logprobs.token_logprobs[1:] == pytest.approx(
        [float(ref[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=1e-4
    )
    assert second.logprobs.token_logprobs[1:] == pytest.approx(first.logprobs.token_logprobs[1:3], abs=1e-4)
    assert got.usage.completion_tokens == 0 and got.usage.prompt_tokens == len(prompt) + 3


def test_chat_logprobs(served):
    client, engine = served
    messages = [{"role": "user", "content": "the quick brown fox"}]
    got = client.chat.completions.create(
        model="tiny-moe", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = got.choices[0].logprobs.content
    ids = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    full = list(ids) + engine.generate([list(ids)], SamplingParams(max_tokens=4))[0].token_ids
    ref = reference_logprobs(engine, full)
    want = [float(ref[i - 1, full[i]]) for i in range(len(ids), len(full))]
    assert [c.logprob for c in content] == pytest.approx(want, abs=1e-4)
    assert all(
        len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content
    )


def test_n_choices_with_derived_seeds(served):
    client, _ = served
    kw = dict(model="tiny-moe", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7)
    got = client.completions.create(n=3, **kw)
    texts = [c.text for c in sorted(got.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(got.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts[0] == client.completions.create(**kw).choices[0].text  # choice 0 keeps the seed itself
    assert texts == [
        c.text for c in sorted(client.completions.create(n=3, **kw).choices, key=lambda c: c.index)
    ]
    assert len(set(texts)) > 1  # the others get their own seeds
    assert (
        got.usage.completion_tokens <= 24
        and got.usage.prompt_tokens == client.completions.create(**kw).usage.prompt_tokens
    )
    batch = client.completions.create(model="tiny-moe", prompt=PROMPTS[:2], n=2, max_tokens=4, temperature=0)
    by_index = {c.index: c.text for c in batch.choices}
    assert sorted(by_index) == [0, 1, 2, 3] and by_index[0] == by_index[1] and by_index[2] == by_index[3]


def test_streaming_n_choices_and_include_usage(served):
    client, _ = served
    kw = dict(model="tiny-moe", prompt=PROMPTS[1], max_tokens=6, temperature=0, n=2)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == {c.index: c.text for c in full.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    chat = list(
        client.chat.completions.create(
            model="tiny-moe",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chat[-1].usage.completion_tokens == 3


def test_max_completion_tokens(served):
    client, _ = served
    got = client.chat.completions.create(
        model="tiny-moe", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3, temperature=0
    )
    assert got.usage.completion_tokens <= 3


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_exits_within_the_graceful_timeout_with_a_wedged_client(tiny_checkpoint, tmp_path):
    """A client that sent half a request and a stream still running do not keep `pregate serve` alive."""
    import signal

    _, proc, port, client = _serve_trained(tiny_checkpoint, tmp_path, "--timeout-graceful", "3")
    wedged = socket.socket()
    try:
        wedged.connect(("127.0.0.1", port))
        wedged.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{")
        stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=200, stream=True)
        next(iter(stream))
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.time() - t0 < 3 + 5
        assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful stop
    finally:
        wedged.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
