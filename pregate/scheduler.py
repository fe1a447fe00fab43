"""Torch-free continuous-batching scheduler with pre-gated (known-in-advance) experts.

Pre-gating routes every token the moment it exists, so each queued token's primary expert is known
before the step runs. The scheduler uses that to group decode tokens by expert (Read-ME Algorithm 1).

Step protocol (one step at a time, vLLM-v1 style)::

    sched.add_request(Request(...))          # any time; waits until its KV reservation fits
    while sched.has_work():
        out = sched.schedule()               # SchedulerOutput: at most one item per running request
        result = runner.execute(out)         # StepResult: sampled experts + finished request ids
        done = sched.update(out, result)     # finished requests (their KV reservation is freed)

Token positions: a request's sequence is its P prompt tokens (positions 0..P-1) followed by its generated
tokens (positions P, P+1, ...). A prefill item covers a contiguous range of not-yet-computed prompt
tokens; the item that completes the prompt produces the first generated token. A decode item feeds the
last sampled (not yet fed) generated token and produces the next one. With top-k routing only the
primary expert id of each token is used here.

Memory model: admission reserves ``P + max_new_tokens`` KV tokens for the whole life of a request
(no preemption), so a running request can always finish. Admission is FCFS in ``add_request`` order
with bounded backfill: while the head of the queue does not fit the KV budget, later requests that fit
are admitted past it (a short request is not blocked behind a large one), but only until the head has
waited ``max_bypass_steps`` steps; from then on nothing overtakes it, so the running requests drain and
it gets in (its wait is at most max_bypass_steps plus the longest remaining run of what was admitted).

No torch here: requests, items and results are plain dataclasses (tested in a subprocess). Owns the
step protocol, admission and the batching policies (`SCHEDULING_POLICIES`, `make_scheduling_policy`);
imports only `pregate.errors`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

from pregate.errors import PregateError, check_int

SCHEDULING_POLICIES = ("expert-aware", "decode-first", "prefill-first", "fcfs")


class SchedulerError(PregateError):
    """Bad scheduler input: a request that can never run, a bad config, or a broken step protocol."""


# --------------------------------------------------------------------------------------------- data


@dataclass
class Request:
    """One generation request as the scheduler sees it: expert ids only, no tensors.

    The engine keeps token ids / KV tensors elsewhere, keyed by ``request_id``. The fields below the
    comment are owned by the scheduler; callers read them but never write them.
    """

    request_id: str
    prompt_experts: list[int]  # primary expert of each prompt token (len = prompt length P)
    max_new_tokens: int
    arrival_time: float = 0.0
    # state the scheduler maintains:
    num_prefilled: int = 0  # prompt tokens whose KV exists
    output_experts: list[int] = field(default_factory=list)  # expert of each generated token
    num_fed: int = 0  # generated tokens already fed back through the model
    finished: bool = False
    waited_steps: int = 0  # consecutive steps it had runnable work but was not scheduled

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_experts)

    @property
    def num_generated(self) -> int:
        return len(self.output_experts)

    @property
    def kv_reserved(self) -> int:
        """KV tokens reserved at admission: the longest the sequence can ever get."""
        return self.prompt_len + self.max_new_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_prefilled < self.prompt_len

    @property
    def runnable(self) -> bool:
        """Has work for the next step: prompt tokens left, or a sampled token not yet fed."""
        return not self.finished and (self.in_prefill or self.num_fed < self.num_generated)

    @property
    def decode_expert(self) -> int:
        """Expert of the pending decode token (only valid when out of prefill and runnable)."""
        return self.output_experts[self.num_fed]


@dataclass(frozen=True)
class ScheduledItem:
    """Work for one request in one step: a prefill chunk or a single decode token."""

    request_id: str
    kind: Literal["prefill", "decode"]
    start: int  # position of the first token of this item in the request's sequence
    num_tokens: int
    experts: tuple[int, ...]  # primary expert per token of this item
    # True for every decode item and for the prefill chunk that completes the prompt: the one definition
    # of which items sample a token (engine, teacher-forced replay and simulator all read it)
    produces_token: bool = True


@dataclass(frozen=True)
class SchedulerOutput:
    """The batch for one step. ``items`` are in admission (arrival) order."""

    items: tuple[ScheduledItem, ...]
    step: int

    @property
    def experts(self) -> frozenset[int]:
        return frozenset(e for it in self.items for e in it.experts)

    @property
    def unique_experts(self) -> int:
        """Distinct routed experts in the step: each one's weights are read once per step."""
        return len(self.experts)

    @property
    def num_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items if it.kind == "prefill")

    @property
    def num_decode_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items if it.kind == "decode")

    @property
    def num_token_rows(self) -> int:
        """Items that produce a token (`ScheduledItem.produces_token`): the rows the LM head computes."""
        return sum(it.produces_token for it in self.items)

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(it.request_id for it in self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items


@dataclass(frozen=True)
class StepResult:
    """What the runner reports after executing a SchedulerOutput.

    ``sampled``: request_id -> primary expert of the token just sampled, for every item that produced a
    token (the item completing a prompt, and every decode item). It may be omitted only for a request
    that is also in ``finished`` (its last token is never fed, so its expert is not needed).
    ``finished``: requests that hit a stop condition (eos, stop string, max tokens); any running
    request may be listed (e.g. a client abort), not only those in this step.
    """

    sampled: Mapping[str, int]
    finished: frozenset[str] = frozenset()


@dataclass
class SchedulerConfig:
    """Batching and memory budgets; identical for every policy so only the ordering differs."""

    policy: str = "expert-aware"  # one of SCHEDULING_POLICIES
    token_budget: int = 256  # max tokens per step (prefill + decode)
    max_running: int = 32  # max admitted requests
    kv_capacity_tokens: int = 16384  # KV budget over running requests (prompt + max_new_tokens each)
    max_wait_steps: int = 2  # expert-aware: a decoding request is skipped at most this many steps in a row
    prefill_chunk: int = 512  # longest prefill chunk per item
    # expert-aware only: once a step is half full, a decode queue whose expert is not already in it is
    # started only if it holds at least this many tokens (smaller ones wait, bounded by max_wait_steps).
    # 1 = never hold back; 2 (default) holds back lone tokens, whose expert would be read for one token.
    # It pays when tokens per step x cost of one expert read > step time (docs/serving.md).
    min_queue_tokens: int = 2
    # every policy: a prompt with more prefill left than this is long. While a shorter prompt waits to
    # prefill, the long ones together take at most half of a step's budget, so a short request behind a
    # burst of long prompts starts within a step or two instead of after all of them (vLLM caps long
    # partial prefills the same way). Long prompts still advance by half a budget per step.
    long_prefill_tokens: int = 256
    # every policy: while the head of the admission queue does not fit the KV budget, later requests
    # that fit are admitted past it for at most this many steps; then nothing overtakes the head until it
    # is in (0 = strict FCFS). Bounds the head's extra wait, so a large request is never starved.
    max_bypass_steps: int = 64

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise SchedulerError(
                f"SchedulerConfig.policy={self.policy!r} is unknown; "
                f"use one of {', '.join(SCHEDULING_POLICIES)}"
            )
        for name in (
            "token_budget",
            "max_running",
            "kv_capacity_tokens",
            "prefill_chunk",
            "min_queue_tokens",
            "long_prefill_tokens",
        ):
            value = getattr(self, name)
            check_int(f"SchedulerConfig.{name}", value, error=SchedulerError)
        for name in ("max_wait_steps", "max_bypass_steps"):
            check_int(f"SchedulerConfig.{name}", getattr(self, name), 0, error=SchedulerError)

    @property
    def waiting_bound_guaranteed(self) -> bool:
        """True when expert-aware can always honour max_wait_steps (see ExpertAwarePolicy)."""
        return self.max_running <= self.token_budget * (self.max_wait_steps + 1)


# ----------------------------------------------------------------------------------------- batches


class Batch:
    """A step under construction: at most one item per request, a token budget, the experts present."""

    def __init__(self, config: SchedulerConfig, runnable: Sequence[Request] = ()) -> None:
        self.budget = self.left = config.token_budget
        self.chunk = config.prefill_chunk
        self.prefill: dict[str, int] = {}  # request_id -> tokens of its prefill chunk
        self.decode: set[str] = set()
        self.present: set[int] = set()
        # long prefills' share of this step (SchedulerConfig.long_prefill_tokens): all of it, unless a
        # short prompt waits to prefill; then what the short ones need, up to half, is kept for them
        self.long_limit = config.long_prefill_tokens
        remaining = [r.prompt_len - r.num_prefilled for r in runnable if r.in_prefill]
        short = sum(n for n in remaining if n <= self.long_limit)
        has_long = any(n > self.long_limit for n in remaining)
        self.long_left = self.budget - min(short, self.budget // 2) if short and has_long else self.budget

    def has(self, r: Request) -> bool:
        return r.request_id in self.prefill or r.request_id in self.decode

    def add_decode(self, r: Request) -> bool:
        if self.left < 1 or self.has(r):
            return False
        self.decode.add(r.request_id)
        self.present.add(r.decode_expert)
        self.left -= 1
        return True

    def add_prefill(self, r: Request, cap: int | None = None) -> int:
        """Add (or grow) r's prefill chunk by up to ``cap`` tokens; returns tokens added."""
        have = self.prefill.get(r.request_id, 0)
        n = min(self.chunk, r.prompt_len - r.num_prefilled) - have
        n = min(n, self.left, cap if cap is not None else n)
        long = r.prompt_len - r.num_prefilled > self.long_limit
        if long:
            n = min(n, self.long_left)
        if n <= 0:
            return 0
        if long:
            self.long_left -= n
        lo = r.num_prefilled + have
        self.prefill[r.request_id] = have + n
        self.present.update(r.prompt_experts[lo : lo + n])
        self.left -= n
        return n

    def add_next(self, r: Request, cap: int | None = None) -> bool:
        """Add r's next item (its prefill chunk or its decode token)."""
        return self.add_prefill(r, cap) > 0 if r.in_prefill else self.add_decode(r)

    def items(self, order: Sequence[Request]) -> tuple[ScheduledItem, ...]:
        out: list[ScheduledItem] = []
        for r in order:
            if r.request_id in self.prefill:
                n, s = self.prefill[r.request_id], r.num_prefilled
                experts = tuple(r.prompt_experts[s : s + n])
                out.append(ScheduledItem(r.request_id, "prefill", s, n, experts, s + n == r.prompt_len))
            elif r.request_id in self.decode:
                pos = r.prompt_len + r.num_fed
                out.append(ScheduledItem(r.request_id, "decode", pos, 1, (r.decode_expert,)))
        return tuple(out)


# ---------------------------------------------------------------------------------------- policies


class BatchPolicy(Protocol):
    """Picks one step's work. ``runnable`` is in admission order; returns a filled Batch."""

    name: ClassVar[str]

    def select(self, runnable: Sequence[Request], config: SchedulerConfig) -> Batch: ...


class FcfsPolicy:
    """Order: arrival. Each runnable request's next item (prefill chunk or decode token) in turn."""

    name: ClassVar[str] = "fcfs"

    def select(self, runnable: Sequence[Request], config: SchedulerConfig) -> Batch:
        # Rule: walk requests in arrival order, add each one's next item, stop when the budget is full.
        b = Batch(config, runnable)
        for r in runnable:
            if b.left == 0:
                break
            b.add_next(r)
        return b


class DecodeFirstPolicy:
    """Order: all decode tokens (arrival order), then prefill chunks (arrival order). DeepSpeed-FastGen."""

    name: ClassVar[str] = "decode-first"

    def select(self, runnable: Sequence[Request], config: SchedulerConfig) -> Batch:
        # Rule: decodes FCFS, then prefill chunks FCFS in the remaining budget.
        b = Batch(config, runnable)
        for r in runnable:
            if not r.in_prefill:
                b.add_decode(r)
        for r in runnable:
            if r.in_prefill:
                b.add_prefill(r)
        return b


class PrefillFirstPolicy:
    """Order: prefill chunks (arrival order), then decode tokens (arrival order). vLLM/TGI-style."""

    name: ClassVar[str] = "prefill-first"

    def select(self, runnable: Sequence[Request], config: SchedulerConfig) -> Batch:
        # Rule: prefill chunks FCFS, then decodes FCFS in the remaining budget.
        b = Batch(config, runnable)
        for r in runnable:
            if r.in_prefill:
                b.add_prefill(r)
        for r in runnable:
            if not r.in_prefill:
                b.add_decode(r)
        return b


def _overdue(decodes: Sequence[Request], config: SchedulerConfig) -> list[Request]:
    """The fewest most-waited decode requests that must run now so max_wait_steps stays reachable.

    Request r has slack d_r = max_wait_steps - waited_steps steps left. After this step, the unserved
    requests with slack <= j must fit in the next j steps (>= 1 token each), i.e. count <= B*j for every
    j >= 1, and the ones with slack 0 must run now. Serving the M earliest-deadline requests, with
    M = max_j(|{d_r <= j}| - B*j), is the least that achieves both (earliest-deadline-first).
    """
    w, budget = config.max_wait_steps, config.token_budget
    by_deadline = sorted(range(len(decodes)), key=lambda i: (max(0, w - decodes[i].waited_steps), i))
    slacks = [max(0, w - decodes[i].waited_steps) for i in by_deadline]
    need, count = 0, 0
    for j in range(w + 1):
        while count < len(slacks) and slacks[count] <= j:
            count += 1
        need = max(need, count - budget * j)
    need = min(need, budget)  # best effort when the bound is infeasible (see waiting_bound_guaranteed)
    return [decodes[i] for i in by_deadline[:need]]


class ExpertAwarePolicy:
    """Read-ME Algorithm 1 for decode tokens, plus bounded waiting and a prefill rule.

    Order within a step:
      1. Overdue decodes (``_overdue``: earliest deadline first, the fewest needed to keep every decoding
         request within ``max_wait_steps`` skipped steps in a row).
      2. Free riders: decode queues of experts already present, largest first (no new expert loaded).
      3. Algorithm 1 on the other decode queues (one queue per expert of the pending decode token): whole
         queues largest first while they fit, then one partial queue, then stop. Once the batch is at least
         half full, queues with fewer than ``min_queue_tokens`` tokens are held back (bounded by step 1): such
         a token costs a whole expert read for itself, while in a near-empty batch holding it back would only
         delay it (measured in the simulator: holding back at light load raised mean latency by 10-25 %).
      4. Prefill chunks, FCFS, in the budget left (as in decode-first). A prompt's tokens span many experts
         and cannot be split by expert (attention needs the whole prefix), so a chunk is taken whole and its
         experts count as present.
      5. Work conservation: budget still left goes to decode queues whose expert is now present.
    Ties: larger queue, then the queue holding the longest-waiting request, then lower expert id; within a
    partial queue, longest-waiting first, then arrival.

    Why decodes keep priority over prompts, as in decode-first: requests admitted to decoding then run to
    completion at one token per step. Pulling prompts in early (e.g. by bounding their wait too) grows the
    decoding pool, which gives Algorithm 1 more to choose from and raises throughput, but every request then
    advances more slowly (processor sharing), and mean and tail normalized latency get worse: measured in
    the simulator, docs/serving.md. So the waiting bound covers decode tokens (time between tokens), and a
    prompt waits FCFS for budget exactly as under decode-first.

    Guarantees: no decoding request is skipped more than ``max_wait_steps`` consecutive steps when
    ``max_running <= token_budget * (max_wait_steps + 1)`` (``config.waiting_bound_guaranteed``); beyond that,
    longest-waiting first (best effort). With ``min_queue_tokens=1`` the budget is never left unused while
    runnable work remains.
    """

    name: ClassVar[str] = "expert-aware"

    def select(self, runnable: Sequence[Request], config: SchedulerConfig) -> Batch:
        # Rule: overdue decodes; decode queues of present experts; Algorithm 1 (largest whole queues, one
        # partial, stop; small queues held back); prefill chunks FCFS in what is left; then free riders.
        b = Batch(config, runnable)
        decodes = [r for r in runnable if not r.in_prefill]
        for r in _overdue(decodes, config):
            b.add_decode(r)
        self._take_queues(decodes, b, config.min_queue_tokens)
        for r in runnable:
            if r.in_prefill:
                b.add_prefill(r)
        self._take_queues(decodes, b, min_tokens=None)  # only queues of present experts
        return b

    @staticmethod
    def _take_queues(decodes: Sequence[Request], b: Batch, min_tokens: int | None) -> None:
        """Free riders, then Algorithm 1. ``min_tokens=None``: free riders only."""
        queues: dict[int, list[Request]] = {}
        for r in decodes:
            if not b.has(r):
                queues.setdefault(r.decode_expert, []).append(r)
        for q in queues.values():
            q.sort(key=lambda r: -r.waited_steps)  # stable: arrival order among equals

        def rank(e: int) -> tuple[int, int, int]:
            return (-len(queues[e]), -queues[e][0].waited_steps, e)

        present = sorted((e for e in queues if e in b.present), key=rank)
        for e in present:
            for r in queues[e]:
                b.add_decode(r)
        if min_tokens is None:
            return
        for e in sorted((e for e in queues if e not in b.present), key=rank):
            if b.left == 0:
                break  # Algorithm 1: after a partial queue the budget is full; stop
            if len(queues[e]) < min_tokens and 2 * b.left <= b.budget:
                continue  # held back, only from a batch at least half full (so never an idle step)
            for r in queues[e]:  # whole queue if it fits, else the partial queue that fills the budget
                if not b.add_decode(r):
                    break


_POLICY_CLASSES: dict[str, Callable[[], BatchPolicy]] = {
    p.name: p for p in (ExpertAwarePolicy, DecodeFirstPolicy, PrefillFirstPolicy, FcfsPolicy)
}
assert tuple(_POLICY_CLASSES) == SCHEDULING_POLICIES


def make_scheduling_policy(name: str) -> BatchPolicy:
    """Policy object by name; an unknown name raises SchedulerError listing the valid ones."""
    if name not in _POLICY_CLASSES:
        raise SchedulerError(
            f"unknown scheduling policy {name!r}; use one of {', '.join(SCHEDULING_POLICIES)}"
        )
    return _POLICY_CLASSES[name]()


# --------------------------------------------------------------------------------------- scheduler


class Scheduler:
    """Admission (FCFS with bounded backfill, KV reservation) + one batching policy + the step protocol."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.policy = make_scheduling_policy(config.policy)
        self._waiting: deque[Request] = deque()
        self._running: dict[str, Request] = {}  # admission order
        self._kv_used = 0
        self._step = 0
        self._pending: SchedulerOutput | None = None  # scheduled, not yet updated
        self._head_wait: tuple[str, int] | None = None  # (queue head, steps it has been the head)

    # -- state
    @property
    def running(self) -> list[Request]:
        return list(self._running.values())

    @property
    def waiting(self) -> list[Request]:
        return list(self._waiting)

    @property
    def kv_used_tokens(self) -> int:
        """KV tokens reserved by running requests (always <= kv_capacity_tokens)."""
        return self._kv_used

    @property
    def num_steps(self) -> int:
        return self._step

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    # -- input
    def add_request(self, req: Request, now: float | None = None) -> None:
        """Queue a request. ``now`` (if given) becomes its arrival_time.

        Raises SchedulerError for a request that can never run (empty prompt, max_new_tokens < 1,
        prompt + max_new_tokens > kv_capacity_tokens, bad expert ids, duplicate id, non-fresh state).
        A request that fits only later waits (FCFS with bounded backfill, see the module docstring).
        """
        rid = req.request_id
        if not req.prompt_experts:
            raise SchedulerError(f"request {rid!r}: empty prompt; send at least one prompt token")
        if not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
            raise SchedulerError(f"request {rid!r}: max_new_tokens={req.max_new_tokens!r} must be >= 1")
        if req.kv_reserved > self.config.kv_capacity_tokens:
            raise SchedulerError(
                f"request {rid!r}: prompt {req.prompt_len} + max_new_tokens {req.max_new_tokens} = "
                f"{req.kv_reserved} tokens exceeds kv_capacity_tokens={self.config.kv_capacity_tokens}; "
                "shorten the prompt, lower max_new_tokens or raise kv_capacity_tokens"
            )
        bad = next((e for e in req.prompt_experts if not isinstance(e, int) or e < 0), None)
        if bad is not None:
            raise SchedulerError(f"request {rid!r}: prompt expert id {bad!r} must be an int >= 0")
        if rid in self._running or any(w.request_id == rid for w in self._waiting):
            raise SchedulerError(f"request id {rid!r} is already queued or running; ids must be unique")
        if req.num_prefilled or req.output_experts or req.num_fed or req.finished or req.waited_steps:
            raise SchedulerError(f"request {rid!r} carries scheduler state; submit a fresh Request")
        if now is not None:
            req.arrival_time = now
        self._waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        """Drop a waiting or running request (e.g. client disconnect); frees its KV. None if unknown.

        Not allowed for a request in the scheduled-but-not-updated step: report it in
        StepResult.finished instead.
        """
        if self._pending is not None and request_id in self._pending.request_ids:
            raise SchedulerError(
                f"request {request_id!r} is in step {self._pending.step}; finish it via update()"
            )
        for w in self._waiting:
            if w.request_id == request_id:
                self._waiting.remove(w)
                w.finished = True
                return w
        if request_id in self._running:
            return self._release(request_id)
        return None

    # -- protocol
    def schedule(self) -> SchedulerOutput:
        """The next step. Empty only when nothing is runnable (no waiting and no running requests)."""
        # Rule: admit waiting requests FCFS while their KV reservation (prompt + max_new_tokens) fits and
        # fewer than max_running run (later ones that fit may pass a head that does not, for at most
        # max_bypass_steps steps); then the policy picks <= 1 item per running request within
        # token_budget; every runnable request not picked has waited_steps += 1, picked ones reset to 0.
        if self._pending is not None:
            raise SchedulerError(
                f"step {self._pending.step} was scheduled but not updated; call update() first"
            )
        self._admit()
        runnable = [r for r in self._running.values() if r.runnable]
        batch = self.policy.select(runnable, self.config)
        out = SchedulerOutput(batch.items(runnable), self._step)
        assert out.num_tokens <= self.config.token_budget
        assert out.items or not runnable, "a policy left every runnable request out"
        for r in runnable:
            r.waited_steps = 0 if batch.has(r) else r.waited_steps + 1
        if out.items:
            self._pending = out
            self._step += 1
        return out

    def update(self, out: SchedulerOutput, result: StepResult) -> list[Request]:
        """Apply a step's result: advance positions, record sampled experts, finish requests.

        Returns the requests finished in this step (in admission order), whose KV is now free. A request
        also finishes on its own once it has max_new_tokens generated tokens.
        """
        if self._pending is None or out is not self._pending:
            raise SchedulerError(
                f"update() got step {out.step}, but the step awaiting update is "
                f"{None if self._pending is None else self._pending.step}; call update once per schedule()"
            )
        producers = {  # items that produce a new token: prompt-completing chunks and decodes
            it.request_id
            for it in out.items
            if it.kind == "decode" or it.start + it.num_tokens == self._running[it.request_id].prompt_len
        }
        extra = set(result.sampled) - producers
        if extra:
            raise SchedulerError(
                f"StepResult.sampled has {sorted(extra)!r}, which produced no token in step {out.step}; "
                "report a sampled expert only for items completing a prompt and for decode items"
            )
        unknown = set(result.finished) - set(self._running)
        if unknown:
            raise SchedulerError(f"StepResult.finished has {sorted(unknown)!r}, which are not running")
        for rid in producers:
            e = result.sampled.get(rid)
            if e is None and rid not in result.finished:
                raise SchedulerError(
                    f"request {rid!r} produced a token in step {out.step} but StepResult.sampled has no "
                    "expert for it; report it (or list the request in finished)"
                )
            if e is not None and (not isinstance(e, int) or e < 0):
                raise SchedulerError(f"StepResult.sampled[{rid!r}]={e!r} must be an expert id >= 0")
        # validated: apply (a rejected result leaves the scheduler unchanged, so it can be retried)
        for it in out.items:
            r = self._running[it.request_id]
            if it.kind == "prefill":
                assert it.start == r.num_prefilled
                r.num_prefilled += it.num_tokens
            else:
                assert it.start == r.prompt_len + r.num_fed
                r.num_fed += 1
            if it.request_id in result.sampled:
                r.output_experts.append(result.sampled[it.request_id])
        self._pending = None
        done = [
            rid
            for rid, r in self._running.items()
            if rid in result.finished or r.num_generated >= r.max_new_tokens
        ]
        return [self._release(rid) for rid in done]

    # -- internals
    def _admit(self) -> None:
        cfg = self.config
        while self._waiting and len(self._running) < cfg.max_running and self._fits(self._waiting[0]):
            self._start(self._waiting.popleft())
        if not self._waiting:
            self._head_wait = None
            return
        # count the head's steps at the head (whatever holds it), and backfill past it within the bound
        head = self._waiting[0].request_id
        steps = self._head_wait[1] + 1 if self._head_wait and self._head_wait[0] == head else 1
        self._head_wait = (head, steps)
        if steps > cfg.max_bypass_steps:
            return  # strict FCFS now: the head gets the next KV that frees up
        for req in list(self._waiting)[1:]:
            if len(self._running) >= cfg.max_running:
                break
            if self._fits(req):
                self._waiting.remove(req)
                self._start(req)

    def _fits(self, req: Request) -> bool:
        return self._kv_used + req.kv_reserved <= self.config.kv_capacity_tokens

    def _start(self, req: Request) -> None:
        self._running[req.request_id] = req
        self._kv_used += req.kv_reserved

    def _release(self, rid: str) -> Request:
        r = self._running.pop(rid)
        r.finished = True
        self._kv_used -= r.kv_reserved
        assert self._kv_used >= 0
        return r


def run_steps(
    sched: Scheduler,
    step_fn: Callable[[SchedulerOutput], StepResult],
    max_steps: int = 1_000_000,
    arrivals: Iterable[tuple[float, Request]] = (),
    clock: Callable[[], float] = lambda: 0.0,
    wait_until: Callable[[float], None] | None = None,
) -> Iterable[tuple[SchedulerOutput, list[Request]]]:
    """The one loop that runs a Scheduler: admit what has arrived, schedule, run (``step_fn``, a runner
    that computes the step or advances a virtual clock by its cost), update; yields (output, finished)
    per step until no work is left. The simulator and the cache benchmark's replay run on it; the engine
    steps itself one step at a time (`Engine.step`) in the same order.

    arrivals: (time, request), each added once clock() reaches its time; when nothing is runnable,
    wait_until(next arrival time) must move the clock there. Requests added to ``sched`` between steps
    (by the consumer) are picked up too."""
    pending = deque(sorted(arrivals, key=lambda a: a[0]))
    steps = 0
    while True:
        while pending and pending[0][0] <= clock():
            at, request = pending.popleft()
            sched.add_request(request, now=at)
        if not sched.has_work():
            if not pending:
                return
            if wait_until is None:
                raise SchedulerError("run_steps: requests arrive later, but no wait_until moves the clock")
            wait_until(pending[0][0])
            continue
        if steps == max_steps:
            raise SchedulerError(f"scheduler still had work after max_steps={max_steps} steps")
        steps += 1
        out = sched.schedule()
        assert not out.is_empty
        yield out, sched.update(out, step_fn(out))
