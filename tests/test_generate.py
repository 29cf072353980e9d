"""Core generation behaviour on the real SmolLM2 model."""

from __future__ import annotations

import sys
import types

import pytest

import parallel_gen as pg
from parallel_gen import progress
from parallel_gen.generate import run_batch
from parallel_gen.core.inputs import param_list, prepare_all

from conftest import PROMPTS_16


def test_single_prompt_string(smol):
    r = pg.generate_parallel(smol, "The capital of France is", max_tokens=8, temperature=0)
    assert isinstance(r, pg.BatchResult) and len(r) == 1
    c = r[0]
    assert c.index == 0 and c.prompt == "The capital of France is"
    assert c.finish_reason in ("stop", "length") and c.error is None
    assert c.completion_tokens == len(c.token_ids) and 1 <= len(c.token_ids) <= 8
    if c.finish_reason == "length":
        assert len(c.token_ids) == 8 and c.stop_reason is None
    else:  # ended by the model's end-of-generation token, reported by id
        assert c.stop_reason == c.token_ids[-1] and smol.handle.is_eog(c.token_ids[-1])
    assert c.text == smol.detokenize(c.token_ids)
    assert r.texts == [c.text]
    assert c.prompt_tokens == len(smol.tokenize(c.prompt))


def test_forty_prompts_eight_slots_in_order(smol):
    prompts = [f"Item {i}: the number {i} written in words is" for i in range(40)]
    r = pg.generate_parallel(smol, prompts, max_tokens=6, temperature=0)
    assert [c.index for c in r] == list(range(40))
    assert [c.prompt for c in r] == prompts
    assert all(c.finish_reason in ("stop", "length") for c in r)
    s = r.stats
    assert s.prompts == 40 and s.failed == 0
    assert s.completion_tokens == sum(len(c.token_ids) for c in r)
    assert s.prompt_tokens == sum(c.prompt_tokens for c in r)
    # Continuous batching: 40 prompts on 8 slots need far fewer decode calls than 40 x 6.
    assert s.decode_calls < 40 * 6 / 3
    # Each prompt's greedy result equals its own run: no mixing between slots.
    for i in (0, 17, 39):
        alone = pg.generate_parallel(smol, prompts[i], max_tokens=6, temperature=0)[0]
        assert alone.token_ids == r[i].token_ids


def test_max_tokens_and_length(smol):
    r = pg.generate_parallel(smol, ["1, 2, 3, 4,"] * 3, params=[
        pg.SamplingParams(max_tokens=1, temperature=0),
        pg.SamplingParams(max_tokens=5, temperature=0),
        pg.SamplingParams(max_tokens=17, temperature=0, ignore_eos=True),
    ])
    assert [len(c.token_ids) for c in r] == [1, 5, 17]
    assert all(c.finish_reason == "length" and c.stop_reason is None for c in r)
    # Greedy is a prefix relation across lengths.
    assert r[2].token_ids[:5] == r[1].token_ids and r[1].token_ids[:1] == r[0].token_ids


def test_eos_stops_and_ignore_eos_continues(smol):
    # An instruction-tuned model ends its answer with <|im_end|> (an EOG token).
    chat = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    stopped = pg.generate_parallel(smol, chat, max_tokens=64, temperature=0)[0]
    assert stopped.finish_reason == "stop"
    eog = stopped.token_ids[-1]
    assert stopped.stop_reason == eog and smol.handle.is_eog(eog)  # stop token reported by id
    assert smol.detokenize([eog], render_special=True) == "<|im_end|>"
    assert "<|im_end|>" not in stopped.text and stopped.text.strip()
    n = len(stopped.token_ids)
    go_on = pg.generate_parallel(smol, chat, max_tokens=n + 10, temperature=0, ignore_eos=True)[0]
    assert go_on.finish_reason == "length" and len(go_on.token_ids) == n + 10
    assert go_on.token_ids[:n] == stopped.token_ids  # same path, then past the EOG


def _token_spanning_stop(smol, token_ids):
    """A stop string that starts inside one token and ends inside a later one."""
    pieces = [smol.detokenize([t]) for t in token_ids]
    for k in range(1, len(pieces) - 1):
        a, b = pieces[k], pieces[k + 1]
        if len(a) >= 2 and len(b) >= 2 and a.isprintable() and b.isprintable():
            return "".join(pieces[:k]), a[-2:] + b[:2]
    raise AssertionError(f"no two printable neighbouring tokens in {pieces!r}")


def test_stop_string_spanning_tokens(smol):
    prompt = "Write a sentence about the sea:"
    free = pg.generate_parallel(smol, prompt, max_tokens=24, temperature=0, ignore_eos=True)[0]
    before, stop = _token_spanning_stop(smol, free.token_ids)
    expect = free.text[: free.text.index(stop)]
    r = pg.generate_parallel(smol, prompt, max_tokens=24, temperature=0, ignore_eos=True,
                             stop=["@@never@@", stop])[0]
    assert r.finish_reason == "stop" and r.stop_reason == stop
    assert r.text == expect and stop not in r.text
    assert len(r.token_ids) < len(free.token_ids)
    assert r.token_ids == free.token_ids[: len(r.token_ids)]


def test_stop_token_ids(smol):
    free = pg.generate_parallel(smol, "1, 2, 3, 4,", max_tokens=12, temperature=0)[0]
    target = free.token_ids[4]
    k = free.token_ids.index(target)
    r = pg.generate_parallel(smol, "1, 2, 3, 4,", max_tokens=12, temperature=0, stop_token_ids=[target])[0]
    assert r.finish_reason == "stop" and r.stop_reason == target
    assert r.token_ids == free.token_ids[: k + 1]
    assert r.text == smol.detokenize(free.token_ids[:k])


def test_over_long_prompt_errors_alone(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=64) as m:
        long_prompt = "word " * 200
        prompts = ["Hello there,", long_prompt, "", "The sky is"]
        r = pg.generate_parallel(m, prompts, max_tokens=8, temperature=0)
        assert [c.finish_reason for c in r][1:3] == ["error", "error"]
        assert "n_ctx=64" in r[1].error and "tokens" in r[1].error
        assert "empty" in r[2].error
        assert r[1].text == "" and r[1].token_ids == []
        for i in (0, 3):
            assert r[i].finish_reason in ("stop", "length") and r[i].error is None
            assert r[i].token_ids == pg.generate_parallel(m, prompts[i], max_tokens=8, temperature=0)[0].token_ids
        assert r.stats.failed == 2


def test_context_full_is_length_not_error(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=32) as m:
        r = pg.generate_parallel(m, ["Count: 1, 2, 3,", "Hi"], max_tokens=500, temperature=0, ignore_eos=True)
        for c in r:
            assert c.finish_reason == "length" and c.error is None
            assert c.prompt_tokens + len(c.token_ids) == 32


def test_seeds(smol):
    prompts = ["Tell me a story about a cat."] * 4
    a = pg.generate_parallel(smol, prompts, max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    b = pg.generate_parallel(smol, prompts, max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    assert a.texts == b.texts  # a seeded call repeats
    assert len(set(a.texts)) > 1  # prompt i uses seed + i: identical prompts still differ
    # A per-prompt SamplingParams seed is used as given: same seed, same prompt, same text.
    same = pg.generate_parallel(smol, prompts[:2], [pg.SamplingParams(max_tokens=24, temperature=1.0, seed=7,
                                                                      ignore_eos=True)] * 2)
    assert same[0].token_ids == same[1].token_ids
    # seed + i: prompt 1 of the seed-1234 call equals prompt 0 of a seed-1235 call.
    c = pg.generate_parallel(smol, prompts[:1], max_tokens=24, temperature=1.0, seed=1235, ignore_eos=True)
    assert c[0].token_ids == a[1].token_ids
    fresh = [pg.generate_parallel(smol, prompts[0], max_tokens=24, temperature=1.0, ignore_eos=True)[0].text
             for _ in range(3)]
    assert len(set(fresh)) > 1  # seed=None: fresh randomness on every call


def test_sampling_settings_change_output(smol):
    prompt = "List some fruits:"
    greedy = pg.generate_parallel(smol, prompt, max_tokens=32, temperature=0, ignore_eos=True)[0]
    top1 = pg.generate_parallel(smol, prompt, max_tokens=32, temperature=1.5, top_k=1, seed=3, ignore_eos=True)[0]
    assert top1.token_ids == greedy.token_ids  # top_k=1 is greedy whatever the temperature
    pen = pg.generate_parallel(smol, prompt, max_tokens=32, temperature=0, repeat_penalty=1.8,
                               ignore_eos=True)[0]
    assert pen.token_ids != greedy.token_ids
    # a heavy repeat penalty leaves fewer repeated tokens
    assert len(set(pen.token_ids)) > len(set(greedy.token_ids))


def test_from_path_string(smollm2_path):
    r = pg.generate_parallel(str(smollm2_path), ["Hello"], max_tokens=3, temperature=0)
    assert len(r[0].token_ids) <= 3 and r.stats.prompts == 1


def test_progress_counts_only_this_calls_tokens_on_a_reused_model(smollm2_path):
    """The progress callback (and so the bar's tokens/s) counts the tokens of this call,
    not every token the Model generated since it was opened."""
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=128) as m:
        pg.generate_parallel(m, PROMPTS_16[:4], max_tokens=40, temperature=0, ignore_eos=True)  # 160 tokens
        seen = []
        params = param_list(None, dict(max_tokens=5, temperature=0, ignore_eos=True), 4)
        r = run_batch(m, prepare_all(m, PROMPTS_16[4:8]), params,
                      on_step=lambda done, total, tokens: seen.append((done, tokens)))
    assert r.stats.completion_tokens == 20
    assert seen[-1] == (4, 20)  # alone on the Model: exactly its own tokens
    assert [t for _, t in seen] == sorted(t for _, t in seen) and all(t <= 20 for _, t in seen)


def test_progress_bar_rate_on_a_reused_model(smollm2_path, monkeypatch):
    bars = []

    class RecordingBar:  # stands in for tqdm.tqdm: records what the bar would show
        def __init__(self, total, **kwargs):
            self.n, self.total, self.postfix = 0, total, []
            bars.append(self)

        def update(self, k):
            self.n += k

        def set_postfix_str(self, s, refresh=True):
            self.postfix.append(s)

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=RecordingBar))
    # The bar's clock reads 0 when it opens, then 1 s: the rate it shows is the tokens it
    # counted, whatever the machine's speed.
    clock = iter([0.0])
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: next(clock, 1.0)))
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=256) as m:
        pg.generate_parallel(m, PROMPTS_16[:4], max_tokens=100, temperature=0, ignore_eos=True)  # 400 tokens
        r = pg.generate_parallel(m, PROMPTS_16[4:8], max_tokens=4, temperature=0, ignore_eos=True, progress=True)
    bar = bars[-1]
    assert bar.total == 4 and bar.n == 4
    # this call's 16 tokens; the bug counted the Model's 400 + 16
    assert bar.postfix[-1] == f"{r.stats.completion_tokens} tok/s" == "16 tok/s"


def test_prompts_longer_than_n_batch_match_a_solo_run(smollm2_path):
    """Prompts of 5-10 times n_batch are fed in chunks, interleaved with the others'
    generation steps; each one's greedy output equals its own run alone."""
    prompts = [f"Story {i}: " + " ".join(PROMPTS_16[(i + k) % 16] for k in range(14 + 4 * i)) for i in range(4)]
    kw = dict(max_tokens=12, temperature=0, ignore_eos=True)
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512, n_batch=16, share_prefix=False) as m:
        lengths = [len(m.tokenize(p)) for p in prompts]
        assert min(lengths) > 5 * 16 and max(lengths) < 512 - 12, lengths
        r = pg.generate_parallel(m, prompts, **kw)
        assert r.stats.failed == 0 and r.stats.prompt_tokens == sum(lengths)
        assert r.stats.decode_calls >= sum(lengths) // 16  # no call held more than n_batch tokens
        alone = [pg.generate_parallel(m, p, **kw)[0].token_ids for p in prompts]
    assert [c.token_ids for c in r] == alone
