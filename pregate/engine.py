"""The serving engine: continuous batching of a pregate MoE with pre-gating.

One engine step (vLLM-v1 style, the protocol of `pregate.scheduler`):

    out = scheduler.schedule()                 # which requests run, how many of their tokens
    pack every item into one flat token stream, one `Segment` (the request's slot in the engine's KV
    cache) per item
    logits = model.forward_packed(stream, segments, routing=stored expert ids/weights of those tokens,
                                  logits_at=rows that produce a token)
    sample each producing request's next token; route all of them at once (router.step_tokens)
    scheduler.update(out, StepResult(sampled={request: expert of the new token}, finished=...))

Pre-gating: a request's prompt is routed when it is added (router.step over the whole prompt with the
request's own RouterCache), and each generated token right after it is sampled, so the scheduler knows
the expert of every queued token before it runs. The MoE groups the step's tokens by expert once per
forward (`RoutingPlan`) and reuses that grouping in every layer.

Memory and admission are the scheduler's: a request reserves prompt + max_tokens KV tokens; one that fits
only later waits (FCFS with bounded backfill), one that can never fit is rejected with the scheduler's
reason. Bad requests fail alone: `add_request` raises `RequestError` before anything is queued,
`generate` turns that into a failed `GenerationOutput` and serves the rest.

Not thread-safe: drive one engine from one thread (an HTTP layer runs `step()` in a single loop).
Legend: T tokens in the step's flat stream, K experts per token, V vocab, E routed experts.
"""

from __future__ import annotations

import itertools
import operator
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from pregate.detokenize import IncrementalDetokenizer
from pregate.errors import PregateError, check_int, check_number
from pregate.metrics import MetricsRecorder
from pregate.moe import MoEForCausalLM, Routing, Segment
from pregate.router import PreGatingRouter
from pregate.scheduler import Request, Scheduler, SchedulerConfig, SchedulerError, SchedulerOutput, StepResult


class RequestError(PregateError):
    """A request the engine cannot serve (bad sampling parameters, empty or too long prompt, no room)."""


class EngineError(PregateError):
    """The engine cannot be built from these parts (model, router, tokenizer do not fit together)."""


# ------------------------------------------------------------------------------------------ sampling

MAX_LOGPROBS = 20  # alternatives per token at most (OpenAI's chat limit)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """logits [N, V] (float32) and the token chosen at each row -> one TokenLogprob per row."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = lp.gather(1, torch.tensor(list(ids), dtype=torch.long).view(-1, 1))[:, 0].tolist()
    top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    return [
        TokenLogprob(int(t), c, tuple(zip(ti, tv)))
        for t, c, ti, tv in zip(ids, chosen, top_i.tolist(), top_v.tolist())
    ]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. temperature 0 is greedy (top_p and seed are then irrelevant).

    max_tokens: new tokens at most. stop: strings that end generation (the text is cut before the stop
    string; the token that completed it is kept in token_ids). seed: per-request generator, so a seeded
    request samples the same tokens whatever else is in its batches; None draws a fresh seed.
    ignore_eos: keep generating past the end-of-sequence token (benchmarks replaying reference lengths).
    logprobs: k -> each generated token comes with its log-probability and the k most likely
    alternatives (`TokenLogprob`), taken from the model's raw logits (before temperature and top-p, as
    OpenAI reports them). prompt_logprobs: k -> the same for every prompt token after the first (an echo
    scores the prompt); max_tokens may then be 0 (score only, nothing generated).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        m, least = self.max_tokens, 0 if self.prompt_logprobs is not None else 1
        check_int("SamplingParams.max_tokens", m, least, error=RequestError, why="0 only to score a prompt")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None:
                check_int(f"SamplingParams.{name}", k, 0, MAX_LOGPROBS, error=RequestError, why="or None")
        check_number(
            "SamplingParams.temperature", self.temperature, minimum=0, error=RequestError, why="0 = greedy"
        )
        check_number(
            "SamplingParams.top_p",
            self.top_p,
            above=0,
            maximum=1,
            error=RequestError,
            why="1 = no nucleus cut",
        )
        s = self.seed
        if s is not None:
            check_int("SamplingParams.seed", s, 0, 2**64 - 1, error=RequestError, why="or None")
        bad = next((s for s in self.stop if not isinstance(s, str) or not s), None)
        if bad is not None:
            raise RequestError(
                f"SamplingParams.stop contains {bad!r}; stop strings must be non-empty strings"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits [V] (float32, CPU): argmax, or temperature + top-p (nucleus) sampling.

    Top-p keeps the smallest set of most likely tokens whose probability reaches top_p (at least one).
    Any temperature > 0 and top_p in (0, 1] work, however small: the logits are shifted so their maximum
    is 0 before dividing (no overflow to inf), and the most likely token always stays in the nucleus.
    """
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass strictly above each token
        cut = before >= params.top_p
        cut[0] = False  # a top_p that underflows float32 still keeps the first token
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


# ------------------------------------------------------------------------------------------ outputs


@dataclass
class RequestOutput:
    """A streaming event: what one request produced in one step (new tokens, new text), or its end."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # "length", "stop", "eos", "abort" or "error"
    error: str | None = None
    internal_error: bool = False  # the error is the engine's fault, not the request's
    logprobs: list[TokenLogprob] | None = None  # one per new token, when SamplingParams.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first event only; None for the first token


@dataclass
class GenerationOutput:
    """The whole result of one request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "length", "stop", "eos", "abort" or "error"
    expert_ids: list[int] = field(default_factory=list)  # primary expert of each fed generated token
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


OutputCallback = Callable[[RequestOutput], None]


@dataclass
class _Sequence:
    """The engine's per-request state: token ids, routing, caches, sampler, streamed text."""

    rid: str
    params: SamplingParams
    tokens: list[int]  # prompt then generated ids
    prompt_len: int
    route_ids: torch.Tensor  # [P + max_tokens, K] long; rows of routed tokens are valid
    route_w: torch.Tensor  # [P + max_tokens, K] float32
    slot: int  # the request's slot in the engine's KV cache; -1 until the scheduler admits it
    rcache: object | None  # the router's RouterCache (None: no routed experts)
    generator: torch.Generator | None
    callback: OutputCallback | None
    detok: IncrementalDetokenizer | None  # None: no tokenizer, no text
    text: str = ""  # generated text (stop string cut off once found)
    sent: int = 0  # characters of text already streamed
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # delivered with the first event
    prompt_logprobs_sent: bool = False

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


# ------------------------------------------------------------------------------------------ engine


class Engine:
    """Continuous-batching runner of a `MoEForCausalLM` under a `Scheduler` policy, with pre-gating.

    model: the MoE (or a dense parent built with 0 routed experts; routing is then None).
    tokenizer: a Hugging Face tokenizer (needed for text prompts, text output and stop strings).
    router: a `PreGatingRouter` over the model's vocabulary and routed experts; required when the model
    has routed experts. scheduler_config: budgets and policy. clock: the metrics clock (injectable).
    expert_store: an `ExpertStore` over the model's checkpoint: routed experts then come from its fast tier
    (at most k resident; load the model with `load_moe(..., routed_experts=False)` so it never holds
    them). Each step is planned into the store as it is scheduled, so Belady sees the experts of the
    running step; units beyond it count as never used again (evicted first, least recently used first).
    """

    def __init__(
        self,
        model: MoEForCausalLM,
        tokenizer=None,
        router: PreGatingRouter | None = None,
        scheduler_config: SchedulerConfig | None = None,
        device: str | torch.device | None = None,
        clock: Callable[[], float] = time.perf_counter,
        expert_store=None,
        history: int | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.scheduler = Scheduler(self.scheduler_config)
        base = model.config.base
        if model.num_experts > 0:
            if router is None:
                raise EngineError(
                    f"the model has {model.num_experts} routed experts, so the engine needs a router; "
                    "pass a PreGatingRouter (e.g. pregate.router.load_router(checkpoint_dir))"
                )
            if not isinstance(router, PreGatingRouter):
                raise EngineError(
                    f"router is a {type(router).__name__}; pre-gating serving needs a PreGatingRouter "
                    "(a layer-wise gate only knows a token's expert inside the backbone)"
                )
            if router.cfg.num_experts != model.num_experts or router.cfg.vocab_size != base["vocab_size"]:
                raise EngineError(
                    f"router (vocab {router.cfg.vocab_size}, {router.cfg.num_experts} experts) does not "
                    "fit the "
                    f"model (vocab {base['vocab_size']}, {model.num_experts} experts); use the router "
                    "trained for it"
                )
            self.router: PreGatingRouter | None = router.to(self.device).eval()
            self.top_k = router.cfg.top_k
        else:
            self.router, self.top_k = None, 1  # dense parent: nothing to route
        self.store = expert_store
        if expert_store is not None:
            dtype = next(model.parameters()).dtype
            if self.router is None or (expert_store.num_experts, expert_store.num_layers) != (
                model.num_experts,
                len(model.layers),
            ):
                raise EngineError(
                    f"the expert store ({expert_store.num_experts} experts, {expert_store.num_layers} "
                    "layers) "
                    f"does not belong to this model ({model.num_experts} experts, {len(model.layers)} layers)"
                )
            if expert_store.dtype != dtype:
                raise EngineError(
                    f"the expert store holds {expert_store.dtype} weights, the model computes in {dtype}; "
                    f"load the model in {expert_store.dtype} (the checkpoint's dtype)"
                )
        # longest sequence: the backbone's positions and the router's cache (the last token is never routed)
        self.max_context = int(base.get("max_position_embeddings") or 1 << 30)
        if self.router is not None:
            self.max_context = min(self.max_context, self.router.cfg.max_seq_len + 1)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        eos = base.get("eos_token_id") if eos is None else eos
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.history = history  # finished requests, steps and failures remembered; None: all (benchmarks)
        self.metrics = MetricsRecorder(clock, keep=history)
        self._seqs: dict[str, _Sequence] = {}
        self.kv = model.new_cache(capacity=64, slots=8)  # one cache for every request, a slot each; grows
        self._ids = itertools.count()
        self._results: dict[str, GenerationOutput] = {}  # finished, not yet collected by generate/stream
        self.failed: dict[
            str, str
        ] = {}  # request_id -> reason, for requests rejected or failed (_record_failure)

    # -- input
    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        callback: OutputCallback | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a prompt (text, or token ids) and route it; returns its request id.

        Raises RequestError (nothing is queued) for an empty prompt, unknown token ids, a sequence longer
        than the context, a request that can never fit the KV budget, or a duplicate id. callback (if
        given) receives this request's RequestOutput events as they happen. arrival_time (metrics clock)
        defaults to now; a trace replay passes the scheduled arrival so late polling counts as latency.
        """
        params = params or SamplingParams()
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._seqs or rid in self._results:
            raise RequestError(f"request id {rid!r} is already in use; ids must be unique")
        ids = self._encode(prompt, rid)
        total = len(ids) + params.max_tokens
        if total > self.max_context:
            raise RequestError(
                f"request {rid!r}: prompt {len(ids)} + max_tokens {params.max_tokens} = {total} tokens "
                f"exceeds the context of {self.max_context}; shorten the prompt or lower max_tokens"
            )
        # everything that can fail comes before the scheduler sees the request, so a failure leaves no trace
        with torch.inference_mode():
            route_ids, route_w, rcache, primary = self._route_prompt(ids, total)
            scored = None
            if params.prompt_logprobs is not None:
                scored = self._score_prompt(ids, route_ids, route_w, params.prompt_logprobs)
        if params.max_tokens == 0:  # scoring only: the prompt's logprobs are the whole answer
            if callback is not None:
                callback(RequestOutput(rid, [], "", True, "length", prompt_logprobs=scored))
            else:
                self._results[rid] = GenerationOutput(
                    rid, list(ids), [], "", "length", prompt_logprobs=scored
                )
            return rid
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.randrange(2**62)
            generator = torch.Generator().manual_seed(seed)
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        seq = _Sequence(
            rid,
            params,
            list(ids),
            len(ids),
            route_ids,
            route_w,
            -1,
            rcache,
            generator,
            callback,
            detok,
            prompt_logprobs=scored,
        )
        try:
            self.scheduler.add_request(Request(rid, primary, params.max_tokens))
        except SchedulerError as err:
            raise RequestError(str(err)) from None
        self._seqs[rid] = seq
        self.metrics.on_arrival(rid, at=arrival_time)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request now (e.g. its client went away); True if it was queued or running."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self.scheduler.abort(request_id)  # never inside a step: step() always updates before returning
        self.metrics.on_abort(request_id)
        self._finish(seq, "abort", [])
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the step
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the events of every request that produced output or ended."""
        if not self.scheduler.has_work():
            return []
        start = self.metrics.clock()
        out = self.scheduler.schedule()
        assert not out.is_empty
        try:
            sampled, finished, new_tokens = self._execute(out)
        except Exception as err:  # our bug or a broken input inside the step: fail its requests, go on
            return self._fail_step(
                out, f"internal error in engine step {out.step}: {type(err).__name__}: {err}"
            )
        now = self.metrics.clock()
        for rid in new_tokens:
            self.metrics.on_token(rid, at=now)
        done = self.scheduler.update(out, StepResult(sampled, frozenset(finished)))
        self.metrics.on_step(
            out.step,
            start,
            out.num_tokens,
            out.unique_experts if self.router is not None else 0,
            out.num_prefill_tokens,
            out.num_decode_tokens,
            out.num_token_rows,
            end=now,
        )
        done_ids = {r.request_id for r in done}
        events: list[RequestOutput] = []
        for rid, tok in new_tokens.items():
            seq = self._seqs.get(rid)
            if seq is None:
                continue  # aborted by an earlier request's callback in this loop
            if rid in done_ids:
                seq.finish_reason = seq.finish_reason or "length"
                self.metrics.on_finish(rid, at=now)
                events.append(self._finish(seq, seq.finish_reason, [tok]))
            else:
                events.append(self._emit(seq, [tok]))
        return events

    def _execute(self, out: SchedulerOutput) -> tuple[dict[str, int], set[str], dict[str, int]]:
        """Forward, sample and route one scheduled step: (sampled experts, finished ids, new tokens).

        Changes only the step's own sequences, so a failure here can be confined to them."""
        with torch.inference_mode():
            logits = self._forward(out)  # [producers, V] float32 on CPU
        sampled: dict[str, int] = {}
        finished: set[str] = set()
        new_tokens: dict[str, int] = {}
        to_route: list[_Sequence] = []  # requests that go on: their new token is routed below, together
        greedy: list[int] | None = None  # every greedy row's token, from one argmax over the step's rows
        row = 0
        for it in out.items:
            seq = self._seqs[it.request_id]
            if not it.produces_token:
                continue  # a prefill chunk that does not complete the prompt
            if seq.params.greedy:  # argmax as sample_token takes it (the first of equal maxima), per row
                greedy = logits.argmax(-1).tolist() if greedy is None else greedy
                tok = greedy[row]
            else:
                tok = sample_token(logits[row], seq.params, seq.generator)
            if seq.params.logprobs is not None:
                seq.logprobs.extend(token_logprobs(logits[row : row + 1], [tok], seq.params.logprobs))
            row += 1
            seq.tokens.append(tok)
            new_tokens[seq.rid] = tok
            reason = self._stop_reason(seq, tok)
            if reason is not None:
                seq.finish_reason = reason
                finished.add(seq.rid)
            else:
                to_route.append(seq)
        assert row == logits.shape[0]
        with torch.inference_mode():
            sampled.update(self._route_tokens(to_route))
        return sampled, finished, new_tokens

    def _fail_step(self, out: SchedulerOutput, message: str) -> list[RequestOutput]:
        """End every request of a failed step with an error event and free its KV; the rest go on."""
        self.scheduler.update(out, StepResult({}, frozenset(out.request_ids)))
        events = []
        for rid in out.request_ids:
            seq = self._seqs.get(rid)
            if seq is None:
                continue
            self._record_failure(rid, message)
            self.metrics.on_abort(rid)
            events.append(self._finish(seq, "error", [], error=message, internal=True))
        return events

    def fail_all(self, message: str) -> None:
        """End every queued and running request with an internal error and start from an empty
        scheduler (the engine loop's last resort when a step failed outside its own guard)."""
        for rid in list(self._seqs):
            self._record_failure(rid, message)
            self.metrics.on_abort(rid)
            self._finish(self._seqs[rid], "error", [], error=message, internal=True)
        self.scheduler = Scheduler(self.scheduler_config)

    # -- drivers
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """Serve all prompts together until done; results in prompt order. A request that cannot be
        served comes back with finish_reason "error" and the message in `error`; the others run."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError(
                f"got {len(plist)} SamplingParams for {len(prompts)} prompts; give one or one per prompt"
            )
        rids: list[str] = []
        for prompt, p in zip(prompts, plist):
            rid = f"gen-{next(self._ids)}"
            try:
                self.add_request(prompt, p, request_id=rid)
            except PregateError as err:
                self._record_failure(rid, str(err))
                ids = list(prompt) if not isinstance(prompt, str) else []
                self._results[rid] = GenerationOutput(rid, ids, [], "", "error", error=str(err))
            rids.append(rid)
        while any(r not in self._results for r in rids):
            self.step()
        return [self._results.pop(r) for r in rids]

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Iterator[RequestOutput]:
        """Add one request and drive the engine (every request progresses) until it ends, yielding its
        events as they happen. Raises RequestError before the first event if it cannot be served."""
        rid = self.add_request(prompt, params, request_id)
        while rid not in self._results:
            for ev in self.step():
                if ev.request_id == rid:
                    yield ev
        self._results.pop(rid)

    def result(self, request_id: str) -> GenerationOutput | None:
        """The finished result of a request added with add_request without a callback (removed once
        read); None if not done. Requests with a callback keep no result (their events carried it all)."""
        return self._results.pop(request_id, None)

    # -- internals
    def _encode(self, prompt: str | Sequence[int], rid: str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(
                    f"request {rid!r}: a text prompt needs an engine built with a tokenizer; pass token ids"
                )
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as err:
                raise RequestError(
                    f"request {rid!r}: the prompt is not valid Unicode text ({err.reason})"
                ) from None
            ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
        else:
            ids = []
            for i in prompt:  # integers only: a float, bool, None or nested list is the client's mistake
                if isinstance(i, bool) or not hasattr(i, "__index__"):
                    raise RequestError(f"request {rid!r}: token ids must be integers, got {i!r}")
                ids.append(operator.index(i))
        if not ids:
            raise RequestError(f"request {rid!r}: empty prompt; send at least one token")
        vocab = self.model.config.base["vocab_size"]
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise RequestError(f"request {rid!r}: token id {bad} is outside the vocabulary [0, {vocab})")
        return ids

    def _route_prompt(self, ids: list[int], total: int):
        """Route the prompt at once: (ids [total, K], weights [total, K], router cache, primary experts)."""
        route_ids = torch.zeros(total, self.top_k, dtype=torch.long, device=self.device)
        route_w = torch.ones(total, self.top_k, dtype=torch.float32, device=self.device)
        if self.router is None:
            return route_ids, route_w, None, [0] * len(ids)
        rcache = self.router.new_cache(1)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        e, w = self.router.route(self.router.step(x, rcache))  # [1, P, K]
        route_ids[: len(ids)], route_w[: len(ids)] = e[0], w[0].float()
        return route_ids, route_w, rcache, e[0, :, 0].tolist()

    def _score_prompt(self, ids: list[int], route_ids, route_w, k: int) -> list[TokenLogprob | None]:
        """Logprobs of every prompt token given the ones before it (None for the first): one forward of
        the prompt alone, outside the KV cache and the scheduler (echo requests pay one extra prefill)."""
        p = len(ids)
        routing = Routing(route_ids[:p], route_w[:p]) if self.router is not None else None
        if self.store is not None:
            self.store.plan([torch.unique(routing.expert_ids).tolist()])
        x = torch.tensor(ids, dtype=torch.long, device=self.device)  # [P]
        logits = self.model.forward_packed(x, [Segment(p)], routing, expert_source=self.store)  # [P, V]
        return [None] + token_logprobs(logits[:-1].float().cpu(), ids[1:], k)

    def _route_tokens(self, seqs: list[_Sequence]) -> dict[str, int]:
        """Route each request's just-sampled token, all in one router step; returns primary experts."""
        if self.router is None or not seqs:
            return {s.rid: 0 for s in seqs}
        x = torch.tensor([s.tokens[-1] for s in seqs], dtype=torch.long, device=self.device)
        e, w = self.router.route(self.router.step_tokens(x, [s.rcache for s in seqs]))  # [B, K]
        w = w.float()
        for i, seq in enumerate(seqs):
            pos = len(seq.tokens) - 1
            seq.route_ids[pos], seq.route_w[pos] = e[i], w[i]
        return dict(zip((s.rid for s in seqs), e[:, 0].tolist()))

    def _forward(self, out: SchedulerOutput) -> torch.Tensor:
        """One forward over the step's packed items -> logits of the token-producing rows [n, V]."""
        ids, segments, rows, routes, weights = [], [], [], [], []
        offset = 0
        for it in out.items:
            seq = self._seqs[it.request_id]
            if seq.slot < 0:  # admitted in this step: its KV is reserved now, so it gets a slot now
                seq.slot = self.kv.acquire(seq.prompt_len + seq.params.max_tokens)  # waiting: no memory
            lo, hi = it.start, it.start + it.num_tokens
            assert self.kv.lengths[seq.slot] == lo, "the scheduler and the KV cache disagree on the position"
            ids.extend(seq.tokens[lo:hi])
            segments.append(Segment(it.num_tokens, self.kv, seq.slot))
            routes.append(seq.route_ids[lo:hi])
            weights.append(seq.route_w[lo:hi])
            offset += it.num_tokens
            if it.produces_token:
                rows.append(offset - 1)
        x = torch.tensor(ids, dtype=torch.long, device=self.device)  # [T]
        routing = Routing(torch.cat(routes), torch.cat(weights)) if self.router is not None else None
        at = torch.tensor(rows, dtype=torch.long, device=self.device)
        if (
            self.store is not None
        ):  # the store's known future: this step's experts, in the order layers use them
            self.store.plan([torch.unique(routing.expert_ids).tolist()])
        logits = self.model.forward_packed(
            x, segments, routing, logits_at=at, expert_source=self.store
        )  # [n, V]
        return logits.float().cpu()

    def _stop_reason(self, seq: _Sequence, tok: int) -> str | None:
        """Update the request's text and say why it stops now (None: it goes on)."""
        if seq.detok is not None:
            old = len(seq.text)
            seq.detok.add([tok])
            text = seq.detok.text
            if seq.params.stop:
                # only the tail can hold a new match: earlier text was checked in earlier steps
                lo = max(0, old - max(len(s) for s in seq.params.stop))
                hits = [i for s in seq.params.stop if (i := text.find(s, lo)) >= 0]
                if hits:
                    seq.text = text[: min(hits)]
                    return "stop"
            seq.text = text
        if tok in self.eos_ids and not seq.params.ignore_eos:
            return "eos"
        if len(seq.generated) >= seq.params.max_tokens:
            return "length"
        return None

    def _emit(
        self,
        seq: _Sequence,
        toks: list[int],
        finished: bool = False,
        error: str | None = None,
        internal: bool = False,
    ) -> RequestOutput:
        # hold back only a tail that could still grow into a stop string, so streamed text never shows one
        hold = 0 if finished else _stop_prefix_len(seq.text, seq.params.stop)
        upto = max(seq.sent, len(seq.text) - hold)
        reason = seq.finish_reason if finished else None
        ev = RequestOutput(seq.rid, toks, seq.text[seq.sent : upto], finished, reason, error, internal)
        seq.sent = upto
        if seq.params.logprobs is not None:
            ev.logprobs = seq.logprobs[seq.logprobs_sent :]
            seq.logprobs_sent = len(seq.logprobs)
        if not seq.prompt_logprobs_sent:
            ev.prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        if seq.callback is not None:
            try:
                seq.callback(ev)
            except Exception as err:  # a broken consumer ends its own request, never the engine
                if not finished:
                    self._record_failure(seq.rid, f"output callback raised {type(err).__name__}: {err}")
                    self.abort(seq.rid)
        return ev

    def _record_failure(self, rid: str, reason: str) -> None:
        self.failed[rid] = reason
        if self.history is not None and len(self.failed) > self.history:
            del self.failed[next(iter(self.failed))]  # the oldest: dicts keep insertion order

    def _finish(
        self, seq: _Sequence, reason: str, toks: list[int], error: str | None = None, internal: bool = False
    ) -> RequestOutput:
        seq.finish_reason = reason
        del self._seqs[seq.rid]
        if seq.slot >= 0:
            self.kv.release(seq.slot)
        if seq.detok is not None and reason not in ("stop", "error"):
            seq.detok.finish()  # an incomplete last character: as the offline decode shows it
            seq.text = seq.detok.text
        if seq.callback is None:  # a streamed request's consumer already has everything: keep nothing
            self._results[seq.rid] = GenerationOutput(
                seq.rid,
                seq.tokens[: seq.prompt_len],
                seq.generated,
                seq.text,
                reason,
                seq.route_ids[seq.prompt_len : len(seq.tokens) - 1, 0].tolist(),
                error=error,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                prompt_logprobs=seq.prompt_logprobs,
            )
        return self._emit(seq, toks, finished=True, error=error, internal=internal)


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string (0: none)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
