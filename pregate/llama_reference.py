"""llama.cpp as the reference engine of `pregate bench step`: which GGUF it loads, copies of it at other
weight types, and its batch-1 step time.

llama.cpp (llama-cpp-python, built from source by `make llama-cpp`) is optional and never a test
dependency: everything here imports `llama_cpp` only when called.

Which weights. The source is `--gguf`, else the base's packaged GGUF (`pregate.hub`). The packaged
SmolLM2 is Q4_1, and pregate's dense parent is that file dequantized (`hub.convert_gguf`), so a copy
requantized from it to bf16 holds the parent's own weights, and one at Q8_0 the parent at llama.cpp's
8-bit precision (the counterpart of `--quantize int8`). The copies are made once with llama.cpp's own
quantizer (`llama_model_quantize`, requantizing allowed) into `<cache>/gguf/` (`hub.cache_dir`) and
reused. A copy's values can be no more precise than its source's: it gives the step time of that
weight type, not a better model.

Timing: each file is loaded once; every repeat prefills `prompt_len` random token ids, drops
`warmup_steps` single-token evals and keeps the median of the next `decode_steps`; repeats interleave
the files, the order rotating each repeat, as `bench step` does for its own systems.
"""

from __future__ import annotations

import ctypes
import importlib.util
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pregate.errors import PregateError

# Weight types a copy can be made at (llama.cpp's LLAMA_FTYPE_MOSTLY_<NAME>).
GGUF_TYPES = ("q8_0", "bf16", "f16", "q4_0", "q4_1")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def source_gguf(given: str | None, base: str | None) -> tuple[Path | None, str]:
    """The GGUF the copies come from (`given`, else the base's packaged one) and a note on what it is."""
    if given is not None:
        return Path(given), "given with --gguf"
    from pregate import hub

    if base in hub.PACKAGED:
        try:
            return hub.packaged_gguf(base), "the packaged GGUF of the base"
        except Exception as err:  # the package is missing: say so, the rest of the benchmark runs
            return None, str(err)
    return None, f"no GGUF for base {base!r}; pass --gguf"


def requantized(src: Path, kind: str, cache: str | Path | None = None) -> Path:
    """A copy of `src` at weight type `kind` (one of GGUF_TYPES), made once in the cache."""
    import llama_cpp

    from pregate.hub import cache_dir

    out = cache_dir(cache) / "gguf" / f"{src.stem}-{src.stat().st_size}.{kind}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.allow_requantize = True
    tmp = out.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise PregateError(f"llama.cpp could not requantize {src} to {kind} (code {rc}); is it a GGUF?")
    tmp.rename(out)  # atomic: a crash never leaves a half-written copy under the final name
    return out


def time_files(
    files: Sequence[Path],
    prompt_len: int,
    warmup_steps: int,
    decode_steps: int,
    repeats: int,
    threads: int,
    prompt: Callable[[int], list[int]],
) -> list[dict[str, list[float]]]:
    """Per file: {"prefill": [s per repeat], "decode": [median s per repeat]} at batch 1.

    prompt(rep) gives the token ids of repeat `rep` (the same for every file)."""
    from llama_cpp import Llama

    n_ctx = prompt_len + warmup_steps + decode_steps + 8
    models = []
    for f in files:
        try:
            models.append(
                Llama(
                    model_path=str(f),
                    n_ctx=n_ctx,
                    n_threads=threads,
                    n_batch=max(8, prompt_len),
                    verbose=False,
                )
            )
        except ValueError as err:  # llama-cpp-python's answer to a file it cannot load
            raise PregateError(
                f"llama.cpp cannot load {f} ({err}); give a GGUF of the dense parent"
            ) from None
    out = [{"prefill": [], "decode": []} for _ in files]
    for rep in range(repeats):
        ids = prompt(rep)
        for j in range(len(files)):
            i = (j + rep) % len(files)  # rotate the order every repeat
            llm = models[i]
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            out[i]["prefill"].append(time.perf_counter() - t)
            times = []
            for s in range(warmup_steps + decode_steps):
                t = time.perf_counter()
                llm.eval([ids[s % len(ids)]])
                times.append(time.perf_counter() - t)
            out[i]["decode"].append(statistics.median(times[warmup_steps:]))
    return out
