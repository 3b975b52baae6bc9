"""Decoding the way users expect (issue 21, Python runtime): the next-token rules against
transformers' logits processors, the sampled distribution, seeds, stop strings and token ids,
streaming, and refusals of bad options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepeft.cli import main
from edgepeft.errors import EdgepeftError
from edgepeft.runtime import Model
from edgepeft.runtime.decode import Picker, Sampling

PROMPT = "w3 w7 w11 w5"


@pytest.mark.parametrize("opts", [dict(temperature=0.7), dict(temperature=1.0, top_k=5),
                                  dict(temperature=1.3, top_p=0.8), dict(temperature=0.9, top_k=20, top_p=0.5),
                                  dict(repetition_penalty=1.3), dict(temperature=0.8, repetition_penalty=0.7,
                                                                     top_k=7, top_p=0.9)])
def test_rules_equal_transformers_processors(opts):
    """The processed logits equal transformers' RepetitionPenalty -> Temperature -> TopK -> TopP
    chain on the same logits and histories (removed tokens -inf in both)."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
    seen = rng.integers(0, 50, (3, 6))
    s = Sampling(**opts)
    chain = []
    if s.repetition_penalty != 1:
        chain.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.temperature:
        chain.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            chain.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1:
            chain.append(TopPLogitsWarper(s.top_p))
    want = LogitsProcessorList(chain)(torch.from_numpy(seen), torch.from_numpy(logits.copy())).numpy()
    got = s.processed(logits, list(seen))
    assert np.array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6, atol=1e-6)
    if s.temperature and (s.top_k or s.top_p < 1):
        assert np.isinf(got).any()  # the filters removed something here


def test_draws_follow_the_distribution():
    """20,000 seeded draws from fixed logits: frequencies within 0.01 of the softmax after the
    filters; filtered-out tokens never drawn."""
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]], np.float32)
    s = Sampling(temperature=0.8, top_k=4, seed=7)
    pick = Picker(s, [np.array([], np.int64)])
    draws = np.array([pick(logits, slice(0, 1))[0] for _ in range(20000)])
    x = s.processed(logits)[0]
    p = np.exp(x - x.max())
    p /= p.sum()
    freq = np.bincount(draws, minlength=6) / len(draws)
    assert np.abs(freq - p).max() < 0.01 and freq[4:].sum() == 0


def test_generate_seeded_and_greedy(llama_side):
    """temperature 0 is the greedy path (unchanged); a seed reproduces a sampled generation,
    other seeds give others; top_k=1 sampling is greedy; rows of a batch draw independently."""
    m = Model(llama_side)
    ids = [[3, 7, 11, 5], [9, 4, 2, 8, 6]]
    greedy = m.generate(ids, max_new_tokens=12, adapter="sql")
    assert np.array_equal(m.generate(ids, max_new_tokens=12, adapter="sql", temperature=0), greedy)
    assert np.array_equal(m.generate(ids, max_new_tokens=12, adapter="sql", temperature=1.0, top_k=1, seed=3), greedy)
    a = m.generate(ids, max_new_tokens=12, adapter="sql", temperature=1.5, seed=11)
    assert np.array_equal(a, m.generate(ids, max_new_tokens=12, adapter="sql", temperature=1.5, seed=11))
    others = [m.generate(ids, max_new_tokens=12, adapter="sql", temperature=1.5, seed=s) for s in (12, 13, 14)]
    assert any(not np.array_equal(a, o) for o in others) and not np.array_equal(a, greedy)
    rp = m.generate(ids, max_new_tokens=12, adapter="sql", repetition_penalty=5.0)
    assert not np.array_equal(rp, greedy)  # greedy with a strong penalty avoids the repeats greedy makes
    assert len(set(rp[0, 5:].tolist())) >= len(set(greedy[0, 5:].tolist()))


def test_stop_strings_tokens_and_streaming(llama_side, capsys):
    """A stop string ends the text before it; a stop token id ends the row; streamed pieces join
    to generate_text's text, with and without stop strings; the CLI streams the same text."""
    m = Model(llama_side)
    full = m.generate_text(PROMPT, max_new_tokens=12, adapter="sql")
    words = full.split()
    assert len(words) >= 4
    stop = " " + words[3]
    want = full[:full.index(stop)]
    assert m.generate_text(PROMPT, max_new_tokens=12, adapter="sql", stop=[stop, "never"]) == want
    assert "".join(m.stream_text(PROMPT, 12, "sql", stop=[stop])) == want
    pieces = list(m.stream_text(PROMPT, 12, "sql"))
    assert "".join(pieces) == full and len(pieces) > 1
    ids = m.tokenizer.encode(PROMPT).ids
    out = m.generate([ids], max_new_tokens=12, adapter="sql")[0, len(ids):]
    tok = int(out[2])
    cut = m.generate([ids], max_new_tokens=12, adapter="sql", stop_token_ids=[tok])[0, len(ids):]
    first = out.tolist().index(tok)
    assert cut[:first + 1].tolist() == out[:first + 1].tolist() and (cut[first + 1:] == cut[first]).all()
    assert main(["run", str(llama_side), "--adapter", "sql", "--prompt", PROMPT, "--max-new-tokens", "12",
                 "--stop", stop, "--stream"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["run", str(llama_side), "--adapter", "sql", "--prompt", PROMPT, "--max-new-tokens", "12",
                 "--temperature", "1.2", "--seed", "5"]) == 0
    sampled = capsys.readouterr().out
    assert sampled == m.generate_text(PROMPT, 12, "sql", temperature=1.2, seed=5) + "\n"


@pytest.mark.parametrize("opts, match", [(dict(temperature=-1), "temperature=-1"), (dict(top_k=-2), "top_k=-2"),
                                         (dict(top_p=0), "top_p=0"), (dict(top_p=1.5), "top_p=1.5"),
                                         (dict(repetition_penalty=0), "repetition_penalty=0"),
                                         (dict(seed=-1), "seed=-1"), (dict(stop=[""]), "stop=")])
def test_bad_options_are_refused(llama_side, opts, match, capsys):
    m = Model(llama_side)
    with pytest.raises(EdgepeftError, match=match):
        m.generate_text(PROMPT, 4, **opts)
    if "stop" not in opts:
        with pytest.raises(EdgepeftError, match=match):
            m.generate([[3, 4]], 4, **opts)
        flag, value = next(iter(opts.items()))
        assert main(["run", str(llama_side), "--prompt", PROMPT, f"--{flag.replace('_', '-')}", str(value)]) == 2
        assert match in capsys.readouterr().err
