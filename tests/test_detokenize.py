"""Incremental detokenization: chunks never split a character and join to the offline decode."""

import pytest
import torch

from pregate.detokenize import IncrementalDetokenizer
from pregate.engine import Engine, SamplingParams, _stop_prefix_len
from pregate.moe import build_moe_from_dense
from tests.conftest import tiny_hf_model, tiny_tokenizer

TEXTS = [
    "naïve café 👩‍🚀 launches",  # a ZWJ emoji sequence: many byte tokens
    "東京で会いましょう。",  # CJK: three bytes per character
    "e\u0301 n\u0303 a\u030a 🎉🎉",  # combining marks
    "plain ascii the quick brown fox",
]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_offline_decode(tmp_path, text):
    tok = tiny_tokenizer(tmp_path)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    chunks = [detok.add([i]) for i in ids] + [detok.finish()]
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in c for c in chunks)
    if text != TEXTS[-1]:
        assert len(ids) > len(text.split())  # the tokenizer really splits characters into byte tokens


def test_random_byte_tokens_stream_the_offline_text(tmp_path):
    """A tiny random model over a byte-level vocabulary samples arbitrary byte sequences (partial and
    invalid UTF-8 included): the streamed text still joins to the decode of the generated ids."""
    tok = tiny_tokenizer(tmp_path)
    hf = tiny_hf_model(seed=3, vocab_size=len(tok))
    n, width = hf.config.num_hidden_layers, hf.config.intermediate_size
    engine = Engine(build_moe_from_dense(hf, [torch.arange(width)] * n, [[] for _ in range(n)]), tok)
    prompt = tok("the quick", add_special_tokens=False)["input_ids"]
    partial = 0  # generations whose byte tokens leave a character incomplete somewhere
    for seed in range(6):
        params = SamplingParams(max_tokens=24, temperature=1.5, seed=seed, ignore_eos=True)
        events = list(engine.stream(prompt, params))
        ids = [t for ev in events for t in ev.new_token_ids]
        assert "".join(ev.new_text for ev in events) == tok.decode(ids, skip_special_tokens=True)
        assert engine.generate([prompt], params)[0].text == tok.decode(ids, skip_special_tokens=True)
        partial += any(
            tok.decode(ids[:k], skip_special_tokens=True).endswith("\ufffd") for k in range(len(ids))
        )
    assert partial  # the property was exercised on split characters, not only on whole ones


def test_stop_strings_hold_back_only_a_possible_prefix():
    assert _stop_prefix_len("hello wor", ("world",)) == 3
    assert _stop_prefix_len("hello", ("world",)) == 0
    assert _stop_prefix_len("ab", ("abc", "bx")) == 2
    assert _stop_prefix_len("xb", ("abc", "bx")) == 1
    assert _stop_prefix_len("", ("abc",)) == 0
