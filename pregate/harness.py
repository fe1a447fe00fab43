"""pregate models as lm-evaluation-harness models: `PregateLM` and the variants `eval tasks` scores.

`PregateLM` is an lm-eval `TemplateLM` over any function `logits_fn(ids [B, n], rows [R]) -> logits
[R, V]` (the logits at flat positions `rows` of the row-major batch: the LM head runs only where a score
is read), so every variant (dense parent, MoE under the trained router, same-size control, random
routing) goes through lm-eval's own request handling. Its three request types follow lm-eval's `hf` backend:
- loglikelihood: lm-eval's `TemplateLM` splits context/continuation tokens; the input is
  (context + continuation)[-(max_length + 1):][:-1] and the score sums log-softmax over the
  continuation's positions (is_greedy: every continuation token is the argmax). Requests with the same
  input tokens share one forward (all of MMLU's one-token answer letters).
- loglikelihood_rolling: lm-eval's disjoint rolling windows (prefix token, context 1), summed.
- generate_until: greedy only; by pregate's serving engine (KV cache) for variants it can serve, else
  KV-free (the whole sequence re-run each step); stop strings and eos handled as lm-eval's helpers do.
Batches are right-padded: every model here is causal, so padding after a row never changes its logits.

Variants (`load_variants`), chosen like `eval ppl` (pregate/evaluate.py):
- dense: the parent, run by pregate's decoder as a MoE whose shared expert holds every channel;
- moe_router: (a `pregate train` output) the MoE routed by its trained router (`router.routing_for`);
- control_trained: (a `pregate train` output) the same-size dense control trained with it;
- control: the untrained same-size control of a `pregate refactor` output;
- moe_random: a uniformly random expert per token (seeded): the floor.
moe_domain and moe_oracle are left out: a downstream task has no domain, and the oracle needs the
parent's activations on the very tokens being scored.

Imports from the package: `errors`, `checkpoint`, `hub`, `moe`, `router`, and `engine`/`scheduler` for
generation (never the trainer).

Legend: B rows, n tokens per row, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from pregate import hub
from pregate.checkpoint import CONTROL_DIR, ROUTER_CONFIG, has_router, is_checkpoint
from pregate.errors import PregateError
from pregate.moe import Routing, Segment, build_moe_from_dense, load_moe
from pregate.router import PreGatingRouter, load_router, router_meta, routing_for

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ids [B, n], rows [R] -> logits [R, V]
GenerateFn = Callable[[list[list[int]], int, list[str]], list[str]]  # (prompts, max new, stops) -> texts

TASK_VARIANTS = ("dense", "moe_router", "control_trained", "control", "moe_random")
DEFAULT_VARIANTS = ("dense", "moe_router", "control_trained")
DEFAULT_MAX_LENGTH = 2048  # lm-eval's own default when a config names no context length


class PregateLM(TemplateLM):
    """An lm-eval model that scores with `logits_fn`; `batch_tokens` caps B * n per forward."""

    def __init__(
        self,
        logits_fn: LogitsFn,
        tokenizer,
        max_length: int,
        batch_size: int = 16,
        batch_tokens: int = 4096,
        name: str = "pregate",
        generate_fn: GenerateFn | None = None,
    ) -> None:
        super().__init__()
        self.logits_fn = logits_fn
        self.generate_fn = generate_fn
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.name = name
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_token_id

    # -- tokens (as lm-eval's hf backend with add_bos_token unset)
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- forward
    def _batches(self, rows: list[list[int]], spans: list[int], desc: str, disable: bool):
        """Yield (indices, logits) over rows sorted longest first, within the token budget: logits[r] [s, V]
        are those of the last spans[i] positions of row i = indices[r]."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        bar = tqdm(total=len(order), desc=desc, unit="seq", disable=disable, leave=False)
        start = 0
        while start < len(order):
            width = len(rows[order[start]])
            take = max(1, min(self.batch_size, self.batch_tokens // max(1, width)))
            idx = order[start : start + take]
            batch = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            for r, i in enumerate(idx):
                batch[r, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
            at = torch.cat(
                [torch.arange(len(rows[i]) - spans[i], len(rows[i])) + r * width for r, i in enumerate(idx)]
            )
            with torch.no_grad():
                flat = self.logits_fn(batch, at)  # [sum of spans, V]
            yield idx, flat.split([spans[i] for i in idx])
            bar.update(len(idx))
            start += take
        bar.close()

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        inputs: dict[tuple[int, ...], int] = {}  # unique input rows -> index into rows
        rows: list[list[int]] = []
        plan = []  # per request: (row index, continuation tokens)
        for _key, context_enc, continuation_enc in requests:
            if len(continuation_enc) > self.max_length:
                raise PregateError(
                    f"a continuation of {len(continuation_enc)} tokens exceeds the "
                    f"context of {self.max_length}"
                )
            inp = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
            row = inputs.setdefault(tuple(inp), len(rows))
            if row == len(rows):
                rows.append(inp)
            plan.append((row, continuation_enc))
        needs: dict[int, list[int]] = {}
        spans = [0] * len(rows)  # positions scored per row: the longest continuation that reads it
        for r, (row, cont) in enumerate(plan):
            needs.setdefault(row, []).append(r)
            spans[row] = max(spans[row], len(cont))
        out: list[tuple[float, bool] | None] = [None] * len(plan)
        for idx, logits in self._batches(rows, spans, f"loglikelihood ({self.name})", disable_tqdm):
            for b, row in enumerate(idx):
                for r in needs[row]:
                    cont = plan[r][1]
                    logp = F.log_softmax(logits[b][spans[row] - len(cont) :].float(), dim=-1)  # [c, V]
                    target = torch.tensor(cont, dtype=torch.long)
                    score = float(logp.gather(1, target[:, None]).sum())
                    greedy = bool((logp.argmax(-1) == target).all())
                    out[r] = (score, greedy)
                    if requests[r][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[r][0], out[r])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=tokens,
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owner, scores):
            totals[i] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode([self.eot_token_id])
        out = []
        for req in tqdm(requests, desc=f"generate_until ({self.name})", disable=disable_tqdm, leave=False):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, 256)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise PregateError(
                    "pregate's lm-eval model decodes greedily only; the task asks for sampling"
                )
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_gen = int(kwargs["max_gen_toks"])
            ids = self.tok_encode(context)[-(self.max_length - max_gen) :]
            if self.generate_fn is not None:
                (text,) = self.generate_fn([ids], max_gen, until)
                text = postprocess_generated_text(text, until, None)
            else:
                text = self._greedy(ids, max_gen, until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _greedy(self, ids: list[int], max_gen: int, until: list[str]) -> str:
        """Greedy decoding by full recomputation; stops at a stop string, eos or max_gen tokens."""
        generated: list[int] = []
        for _ in range(max_gen):
            with torch.no_grad():
                seq = torch.tensor([ids + generated], dtype=torch.long)
                logits = self.logits_fn(seq, torch.tensor([seq.shape[1] - 1]))  # [1, V]
            tok = int(logits[0].argmax())
            generated.append(tok)
            if tok == self.eot_token_id:
                break
            if any(s in self.tok_decode(generated) for s in until):
                break
        return postprocess_generated_text(self.tok_decode(generated), until, None)


# ----------------------------------------------------------------------------------------- variants


def engine_generate(model, tokenizer, router=None) -> GenerateFn:
    """Greedy generation by pregate's serving engine (KV cache, pre-gating: the router routes each token
    once as it arrives): what the KV-free loop computes, without re-reading the prompt per token."""
    from pregate.engine import Engine, SamplingParams
    from pregate.scheduler import SchedulerConfig

    def generate(prompts: list[list[int]], max_gen: int, until: list[str]) -> list[str]:
        engine = Engine(model, tokenizer, router, SchedulerConfig(policy="fcfs", token_budget=512))
        outs = engine.generate(prompts, SamplingParams(max_tokens=max_gen, stop=tuple(s for s in until if s)))
        failed = next((o.error for o in outs if o.finish_reason == "error"), None)
        if failed:
            raise PregateError(f"generation failed: {failed}")
        return [o.text for o in outs]

    return generate


def _packed(model, ids: torch.Tensor, rows: torch.Tensor, routing, layer_router=None) -> torch.Tensor:
    """`MoEForCausalLM.forward` on ids [B, n] as B equal segments, logits only at flat positions rows."""
    b, n = ids.shape
    return model.forward_packed(
        ids.reshape(-1), [Segment(n) for _ in range(b)], routing, layer_router, logits_at=rows
    )


def dense_as_moe(hf_model):
    """The parent in pregate's decoder: a MoE with no routed experts whose shared expert is the MLP."""
    n = hf_model.config.num_hidden_layers
    return build_moe_from_dense(
        hf_model, [torch.arange(hf_model.config.intermediate_size)] * n, [[] for _ in range(n)]
    )


def load_variants(model: str, variants: list[str] | None, cache: str | None = None, seed: int = 0):
    """(tokenizer, max_length, {variant: factory() -> (LogitsFn, GenerateFn | None)}, info).

    model: a MoE checkpoint (`pregate refactor` or `pregate train` output) or a base model (packaged
    name, .gguf, HF directory; dense only). variants None: the defaults the checkpoint has; a variant
    asked for by name that the checkpoint cannot provide is an error that says what provides it.
    Factories load lazily, so one variant is in memory at a time.
    """
    unknown = [v for v in variants or [] if v not in TASK_VARIANTS]
    if unknown:
        raise PregateError(f"unknown variant(s) {unknown}; choose from {', '.join(TASK_VARIANTS)}")
    path = Path(model)
    is_moe = is_checkpoint(path)
    if is_moe:
        moe_probe = load_moe(path, torch.float32)
        base = moe_probe.config.provenance.get("base")
        trained = bool(moe_probe.config.provenance.get("parent"))
        del moe_probe
        if not base:
            raise PregateError(
                f"{model} does not record its base model; was it written by `pregate refactor`?"
            )
    else:
        base, trained = model, False
    available = {"dense": "always"}
    reasons = {}
    if is_moe:
        available["moe_random"] = "MoE"
        if has_router(path):
            available["moe_router"] = "router"
        else:
            reasons["moe_router"] = (
                f"{model} holds no trained router ({ROUTER_CONFIG}); give a `pregate train` output"
            )
        if (path / CONTROL_DIR).is_dir():
            available["control_trained" if trained else "control"] = "control"
        reasons.setdefault(
            "control_trained", f"{model} is not a `pregate train` output with a trained control"
        )
        reasons.setdefault("control", f"{model} is not a `pregate refactor` output with a control")
    else:
        for v in TASK_VARIANTS[1:]:
            reasons[v] = (
                f"{model} is a dense base model; {v} needs a MoE checkpoint (`pregate refactor`/`train`)"
            )
    for v in variants or []:
        if v not in available:
            raise PregateError(f"variant {v}: {reasons[v]}")
    chosen = list(variants) if variants else [v for v in DEFAULT_VARIANTS if v in available]
    hf_dir = hub.resolve(base, cache)
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    max_length = int(getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH)
    if "moe_router" in available:  # the router's positions bound every variant's context (same truncation)
        meta = router_meta(path)
        max_length = min(max_length, int(meta.get("config", {}).get("max_seq_len", max_length)))

    def dense() -> tuple[LogitsFn, GenerateFn]:
        parent = dense_as_moe(hub.load_dense(base, torch.float32, cache)[0])
        return lambda ids, rows: _packed(parent, ids, rows, None), engine_generate(parent, tokenizer)

    def moe_router() -> tuple[LogitsFn, GenerateFn | None]:
        moe, router = load_moe(path, torch.float32), load_router(path)
        engine = engine_generate(moe, tokenizer, router) if isinstance(router, PreGatingRouter) else None
        return lambda ids, rows: _packed(moe, ids, rows, *routing_for(router, ids)), engine

    def control(sub: str = CONTROL_DIR) -> tuple[LogitsFn, GenerateFn]:
        ctrl = load_moe(path / sub, torch.float32)
        return lambda ids, rows: _packed(ctrl, ids, rows, None), engine_generate(ctrl, tokenizer)

    def moe_random() -> tuple[LogitsFn, None]:
        moe = load_moe(path, torch.float32)
        gen = torch.Generator().manual_seed(seed)
        return lambda ids, rows: _packed(
            moe, ids, rows, Routing.top1(torch.randint(0, moe.num_experts, (ids.numel(),), generator=gen))
        ), None  # no router for the engine: KV-free generation

    factories = {
        "dense": dense,
        "moe_router": moe_router,
        "control_trained": control,
        "control": control,
        "moe_random": moe_random,
    }
    info = {
        "model": str(model),
        "base": base,
        "checkpoint": "moe" if is_moe else "dense",
        "available": sorted(available),
    }
    return tokenizer, max_length, {v: factories[v] for v in chosen}, info


# ----------------------------------------------------------------------------------------- the peer


def _loglikelihoods(samples: list[dict]) -> dict[tuple[int, int], float]:
    """{(doc_id, choice): log-likelihood} from lm-eval's logged samples."""
    out = {}
    for s in samples:
        for j, resp in enumerate(s["resps"]):
            out[(s["doc_id"], j)] = float(resp[0][0])
    return out


def crosscheck_hf(
    base: str, task_list: list[str], limit: int, cache: str | None = None, batch_size: int = 8
) -> dict:
    """Our `dense` variant against lm-eval's own `hf` backend on the converted parent checkpoint.

    Both run the same local tasks; per task: the largest per-item log-likelihood difference, how many
    items differ in their chosen answer, and both accuracies.
    """
    import tempfile

    from lm_eval.models.huggingface import HFLM

    from pregate import tasks

    task_list = tasks.check_tasks(task_list)
    tokenizer, max_length, factories, _ = load_variants(base, ["dense"], cache)
    ours = PregateLM(factories["dense"]()[0], tokenizer, max_length, batch_size=batch_size, name="dense")
    peer = HFLM(
        pretrained=str(hub.resolve(base, cache)), dtype="float32", device="cpu", batch_size=batch_size
    )
    report = {"base": base, "limit": limit, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="pregate-tasks-") as tmp:
        tasks.write_task_yamls(Path(tmp), task_list)
        runs = {
            name: tasks.run_lm_eval(lm, task_list, limit, Path(tmp), log_samples=True)
            for name, lm in (("pregate", ours), ("hf", peer))
        }
    for t in runs["pregate"]["samples"]:
        a, b = (_loglikelihoods(runs[n]["samples"][t]) for n in ("pregate", "hf"))
        assert a.keys() == b.keys(), "both backends must see the same requests"
        row = {
            "items": len(runs["pregate"]["samples"][t]),
            "requests": len(a),
            "max_abs_diff": max(abs(a[k] - b[k]) for k in a),
        }
        for name in ("pregate", "hf"):
            row[f"acc_{name}"] = runs[name]["results"][t].get("acc,none")
            row[f"acc_norm_{name}"] = runs[name]["results"][t].get("acc_norm,none")
        report["tasks"][t] = row
    return report
