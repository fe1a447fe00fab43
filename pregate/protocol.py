"""OpenAI request bodies, validated and canonicalised in one place before anything reaches the engine;
and the logprobs objects of the answers.

`parse_completion(body)` and `parse_chat(body)` turn a decoded JSON object into an `ApiRequest`, or raise
`BadField` naming the field that is wrong (HTTP 400, or 404 for an unknown model). The rules:

- Every field OpenAI defines is either served, accepted at the value that changes nothing (e.g.
  `presence_penalty: 0`, `tools: []`, `response_format: {"type": "text"}`), or refused with a 400 that
  names it. A field OpenAI does not define is refused too ("unrecognized"), as OpenAI does. Fields that
  never change the answer (`user`, `metadata`, `store`, `service_tier`) are ignored. `null` means absent.
- Prompts: a string, a list of token ids, or OpenAI's batch forms (a list of strings, a list of token
  lists), each prompt then giving `n` choices (choice index = prompt * n + j, as OpenAI).
- Chat messages: roles system/user/assistant only; content a string or a list of text parts
  (`[{"type": "text", "text": ...}]`, joined with "\n" as vLLM does); any other part type is refused.
- Booleans must be JSON booleans; integers must be JSON integers; numbers may not be booleans.
- A seeded request with n > 1 gives choice 0 the seed itself and choice j a seed derived from (seed, j),
  so n choices differ and each is reproducible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from pregate.detokenize import IncrementalDetokenizer
from pregate.engine import MAX_LOGPROBS, SamplingParams, TokenLogprob
from pregate.errors import PregateError, check_int

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_CHOICES = 16  # n x prompts at most, per request
MAX_COMPLETION_LOGPROBS = 5  # as OpenAI's completions endpoint
MAX_DEPTH = 32  # JSON nesting; a real request needs 5
ROLES = ("system", "user", "assistant")

IGNORED = frozenset({"user", "metadata", "store", "service_tier"})  # never change the answer
COMMON = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed"}
)
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
# fields we do not serve, with the values at which they change nothing (accepted as if absent)
NEUTRAL: dict[str, tuple] = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "reasoning_effort": (),
    "prediction": (),
    "audio": (),
    "web_search_options": (),
}


class BadField(PregateError):
    """A request field with a wrong type or value; `param` names it for OpenAI's error object."""

    def __init__(self, param: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True)
class ApiRequest:
    """One validated request: the prompts (completions) or messages (chat), and how to serve them.

    params: sampling shared by every choice (`choice_params(i)` adds the per-choice seed).
    logprobs: alternatives per token (completions: 0..5; chat: top_logprobs), None when not asked.
    echo: completions only, the prompt is prepended to each choice (with its logprobs if asked).
    """

    chat: bool
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    prompts: tuple[str | tuple[int, ...], ...] = ()
    messages: tuple[dict, ...] = ()

    def choice_params(self, j: int) -> SamplingParams:
        """Sampling of the j-th choice of a prompt: the seed itself for j = 0, a derived seed after."""
        seed = self.params.seed
        if seed is None or j == 0:
            return self.params
        digest = hashlib.blake2b(f"{seed}:{j}".encode(), digest_size=8).digest()
        return replace(self.params, seed=int.from_bytes(digest, "big"))


def check_depth(obj: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than `limit` (checked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                raise BadField(None, f"the request body is nested more than {limit} levels deep")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((c, depth + 1) for c in children)


def parse_completion(body: dict, model_name: str) -> ApiRequest:
    _check_fields(body, COMPLETION_FIELDS, model_name)
    prompts = _prompts(body.get("prompt"))
    echo = _bool(body, "echo")
    logprobs = _int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    max_tokens = _int(body, "max_tokens", 0, None)
    if max_tokens == 0 and not echo:
        raise BadField(
            "max_tokens", "max_tokens=0 is only meaningful with echo (scoring the prompt); send at least 1"
        )
    prompt_logprobs = logprobs if echo and logprobs is not None else None
    params = _sampling(body, max_tokens, logprobs, prompt_logprobs, "max_tokens")
    req = ApiRequest(False, params, prompts=prompts, echo=echo, logprobs=logprobs, **_common(body))
    _check_choices(req, len(prompts))
    return req


def parse_chat(body: dict, model_name: str) -> ApiRequest:
    _check_fields(body, CHAT_FIELDS, model_name)
    messages = _messages(body.get("messages"))
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise BadField("top_logprobs", "top_logprobs needs logprobs: true")
    logprobs = (top or 0) if want else None
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, 1, None)
    params = _sampling(body, max_tokens, logprobs, None, name)
    req = ApiRequest(True, params, messages=messages, logprobs=logprobs, **_common(body))
    _check_choices(req, 1)
    return req


# ------------------------------------------------------------------------------------------ fields


def _check_fields(body: dict, served: frozenset, model_name: str) -> None:
    for key, value in body.items():
        if value is None or key in served or key in IGNORED:
            continue
        if key in NEUTRAL:
            if value not in NEUTRAL[key]:
                raise BadField(key, f"{key} is not supported by this server (got {value!r:.80})")
            continue
        raise BadField(key, f"unrecognized request argument supplied: {key}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise BadField(
            "model", f"the model {model!r:.80} does not exist; this server serves {model_name!r}", 404
        )


def _common(body: dict) -> dict:
    n = _int(body, "n", 1, MAX_CHOICES)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise BadField("stream_options", "stream_options is only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise BadField(
                "stream_options", f'stream_options must be {{"include_usage": bool}}, got {options!r:.80}'
            )
        include_usage = _bool(options, "include_usage", param="stream_options.include_usage")
    return {"n": 1 if n is None else n, "stream": stream, "include_usage": include_usage}


def _check_choices(req: ApiRequest, prompts: int) -> None:
    if prompts * req.n > MAX_CHOICES:
        raise BadField(
            "n", f"{prompts} prompt(s) x n={req.n} is {prompts * req.n} choices; at most {MAX_CHOICES}"
        )


def _bool(body: dict, key: str, param: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadField(param or key, f"{param or key} must be true or false, got {value!r:.80}")
    return value


def _int(body: dict, key: str, lo: int, hi: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    try:
        return check_int(key, value, lo, hi)
    except PregateError as err:
        raise BadField(key, str(err)) from None


def _sampling(body: dict, max_tokens: int | None, logprobs, prompt_logprobs, max_name: str) -> SamplingParams:
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise BadField("stop", f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        stop = tuple(stop)
    else:
        raise BadField("stop", f"stop must be a string or a list of strings, got {stop!r:.80}")
    fields = {"temperature": body.get("temperature"), "top_p": body.get("top_p"), "seed": body.get("seed")}
    values = {k: v for k, v in fields.items() if v is not None}
    try:
        return SamplingParams(
            max_tokens=16 if max_tokens is None else max_tokens,
            stop=stop,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            **values,
        )
    except PregateError as err:
        name = next((k for k in fields if f".{k}=" in str(err)), None)
        raise BadField(max_name if ".max_tokens=" in str(err) else name, str(err)) from None


def _prompts(prompt) -> tuple:
    """The prompts of a completions request: a string, a token list, or a list of either."""
    if isinstance(prompt, str):
        return (_text(prompt, "prompt"),)
    if not isinstance(prompt, list) or not prompt:
        raise BadField(
            "prompt", "prompt must be a string, a list of token ids, or a non-empty list of either"
        )
    if all(isinstance(p, str) for p in prompt):
        return tuple(_text(p, "prompt") for p in prompt)
    if all(isinstance(p, list) for p in prompt):
        return tuple(_tokens(p) for p in prompt)
    return (_tokens(prompt),)


def _text(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadField(param, f"{param} is not valid Unicode text ({err.reason})") from None
    return text


def _tokens(ids: list) -> tuple[int, ...]:
    if not ids:
        raise BadField("prompt", "empty token list; send at least one token")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise BadField("prompt", f"token ids must be integers, got {i!r:.80}")
    return tuple(ids)


def _messages(messages) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise BadField("messages", "messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadField(where, f"{where} must be an object with role and content")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise BadField(f"{where}.{sorted(extra)[0]}", f"{where} has unsupported field(s) {sorted(extra)}")
        role = m.get("role")
        if role not in ROLES:
            raise BadField(f"{where}.role", f"{where}.role must be one of {list(ROLES)}, got {role!r:.80}")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    return tuple(out)


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return _text(content, where)
    if not isinstance(content, list) or not content:
        raise BadField(where, f"{where} must be a string or a non-empty list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise BadField(
                f"{where}[{j}]", f"{where}[{j}]: only text parts are supported, got type {kind!r:.40}"
            )
        texts.append(_text(part["text"], f"{where}[{j}]"))
    return "\n".join(texts)


# ------------------------------------------------------------------------------------------ logprobs


def token_text(tokenizer, token_id: int) -> str:
    """A token's own text (half a character decodes as U+FFFD, as OpenAI's token strings do)."""
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def text_offsets(tokenizer, ids: list[int], start: int) -> list[int]:
    """Where each token's text starts, from `start`: incremental detokenization, so a token that ends
    half a character points at that character's start."""
    if tokenizer is None:
        return [start] * len(ids)
    detok, out = IncrementalDetokenizer(tokenizer), []
    for t in ids:
        out.append(start + len(detok.text))
        detok.add([t])
    return out


def completion_logprobs(
    tokenizer,
    prompt: list[tuple[int, TokenLogprob | None]],
    generated: list[TokenLogprob],
    start: int,
    echoed_len: int,
) -> dict:
    """OpenAI's completions logprobs object {tokens, token_logprobs, top_logprobs, text_offset}.

    prompt: echoed prompt tokens with their logprobs (None for the first), at text offsets from `start`;
    generated: new tokens, at offsets from start + echoed_len (the echoed text's length). Each
    top_logprobs dict holds the alternatives and the chosen token (tokens with the same text: the
    likeliest), as vLLM; lm-eval's greedy check compares the chosen logprob with its maximum."""
    entries = prompt + [(t.token_id, t) for t in generated]
    offsets = text_offsets(tokenizer, [t for t, _ in prompt], start)
    offsets += text_offsets(tokenizer, [t.token_id for t in generated], start + echoed_len)
    top: list[dict | None] = []
    for t, lp in entries:
        if lp is None:
            top.append(None)
            continue
        d: dict[str, float] = {}
        for alt, v in lp.top:
            d.setdefault(token_text(tokenizer, alt), v)
        d.setdefault(token_text(tokenizer, t), lp.logprob)
        top.append(d)
    return {
        "tokens": [token_text(tokenizer, t) for t, _ in entries],
        "token_logprobs": [None if lp is None else lp.logprob for _, lp in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, generated: list[TokenLogprob]) -> dict:
    """OpenAI's chat logprobs object {content: [{token, logprob, bytes, top_logprobs}]}."""

    def entry(t: int, v: float) -> dict:
        s = token_text(tokenizer, t)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    content = [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(a, v) for a, v in lp.top]}
        for lp in generated
    ]
    return {"content": content}
