"""The prompt cache: KV that outlives a request (Model(prompt_cache=True), the default).

Each test opens its own Model, so what the cache holds is what the test put there.
Splitting a prefill at a different point changes llama.cpp's numerics slightly on this
CPU (a token's logprob by a few hundredths), which flips near-ties between greedy tokens
(" positive" / " Positive"). Outputs from a cached prefix are therefore compared by the
first token's log-probability, which a broken KV reuse would derail, and by the share of
outputs that are identical whole.
"""

from __future__ import annotations

import json
import time

import pytest

import parallel_gen as pg
from conftest import agree_up_to_near_ties

INSTRUCTION = ("You are a careful annotator. Read the review below and classify its sentiment as positive, "
               "negative or neutral, then explain your choice in one short sentence. ") * 3
REVIEWS = ["I loved it.", "Terrible service, never again.", "It was fine I guess.", "Best pizza in town!",
           "The plot dragged on.", "Okay value for money.", "Staff were rude.", "Would recommend it."]
GREEDY = dict(temperature=0, ignore_eos=True)


def _prompts(reviews=REVIEWS, prefix=INSTRUCTION):
    return [f"{prefix}Review: {r}\nSentiment:" for r in reviews]


def _engine(model, fn):
    return model._require_runner().run_on_engine(fn)


def _kv(model):
    """(KV held beyond the cache, KV the cache holds, live sequences)."""
    return _engine(model, lambda e: (e.kv_tokens, e.cached_tokens, e.n_live))


def _ids(result):
    return [c.token_ids for c in result]


def test_a_repeated_instruction_is_decoded_once_across_calls(smollm2_path):
    """A second call whose prompts share the first call's instruction decodes only what
    is new; outputs agree with a Model without the cache."""
    kw = dict(max_tokens=12, logprobs=2, **GREEDY)
    first, second = _prompts(REVIEWS[:4]), _prompts(REVIEWS[4:])
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512) as m:
        n_instr = len(m.tokenize(INSTRUCTION))
        a = pg.generate_parallel(m, first, **kw)
        # the four share their instruction (a queue-time prefix, looked up and missed once)
        assert a.stats.prompt_cache_misses == 1 and a.stats.prompt_cache_hits == 0
        assert a.stats.cached_prompt_tokens == 0 and a.stats.prefix_tokens_reused > 3 * n_instr
        kv, cached, live = _kv(m)
        assert kv == 0 and live == 0 and cached > 4 * n_instr  # every stream kept its sequence
        b = pg.generate_parallel(m, second, **kw)
        s = b.stats
        assert s.prompt_cache_hits == 4 and s.prompt_cache_misses == 0 and s.prompt_cache_hit_rate == 1.0
        assert s.cached_prompt_tokens >= 4 * (n_instr - 2)
        assert s.prompt_tokens - s.cached_prompt_tokens < 4 * 20  # only the reviews were decoded
        assert s.prefix_tokens_reused == 0
        assert _kv(m)[0] == 0
        st = m.stats()
        assert st.prompt_cache_hits == 4 and st.cached_prompt_tokens == s.cached_prompt_tokens
        assert st.kv_tokens_cached == _kv(m)[1] > 0 and st.kv_tokens == 0
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512, prompt_cache=False) as off:
        ref = pg.generate_parallel(off, second, **kw)
        assert ref.stats.cached_prompt_tokens == 0 and ref.stats.prompt_cache_misses == 0
        assert _engine(off, lambda e: e.cached_tokens) == 0
    agree_up_to_near_ties(b, ref)


def test_misses_on_unrelated_prompts(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256) as m:
        a = pg.generate_parallel(m, ["The capital of France is", "Once upon a time"], max_tokens=4, **GREEDY)
        b = pg.generate_parallel(m, ["def fib(n):", "Water boils at"], max_tokens=4, **GREEDY)
        # SmolLM2 adds no BOS token: nothing at all is shared
        for r in (a, b):
            assert r.stats.prompt_cache_misses == 2 and r.stats.prompt_cache_hits == 0
            assert r.stats.cached_prompt_tokens == 0 and r.stats.prompt_cache_hit_rate == 0.0


def test_a_cached_prefix_longer_than_the_new_prompt(smollm2_path):
    """The cache holds prompt + output; asking the same prompt again (or the prompt plus
    part of its output) reuses all but the last prompt token, which is decoded for its
    logits."""
    prompt = _prompts()[0]
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=512) as m:
        n = len(m.tokenize(prompt))
        a = pg.generate_parallel(m, prompt, max_tokens=16, **GREEDY)[0]
        again = pg.generate_parallel(m, prompt, max_tokens=16, **GREEDY)
        assert again.stats.cached_prompt_tokens == n - 1 and again.stats.prompt_tokens == n
        assert again[0].token_ids[:8] == a.token_ids[:8]
        # the prompt plus the first 4 generated tokens' text: the cache holds those tokens too
        longer = prompt + m.detokenize(a.token_ids[:4])
        m_longer = len(m.tokenize(longer))
        cont = pg.generate_parallel(m, longer, max_tokens=4, **GREEDY)
        assert cont.stats.cached_prompt_tokens == m_longer - 1
        assert cont[0].token_ids[:2] == a.token_ids[4:6]
        # a prompt that is a strict prefix of a cached one
        short = INSTRUCTION + "Review:"
        s = pg.generate_parallel(m, short, max_tokens=2, **GREEDY)
        assert s.stats.cached_prompt_tokens == len(m.tokenize(short)) - 1
        assert _kv(m)[0] == 0


def test_per_request_opt_out_and_the_model_switch(smollm2_path):
    prompts = _prompts(REVIEWS[:2])
    kw = dict(max_tokens=4, **GREEDY)
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=512) as m:
        pg.generate_parallel(m, prompts, **kw)
        cached_before = _kv(m)[1]
        out = pg.generate_parallel(m, prompts, cache_prompt=False, **kw)
        s = out.stats
        assert s.cached_prompt_tokens == 0 and s.prompt_cache_hits == 0 and s.prompt_cache_misses == 0
        assert s.prompt_tokens == sum(len(m.tokenize(p)) for p in prompts)  # decoded whole
        # the opted-out prompts took streams and kept nothing in them
        assert _kv(m)[1] < cached_before and _kv(m)[0] == 0
        # per prompt: one prompt opts out, the other hits what the first left... nothing now
        mixed = pg.generate_parallel(m, prompts, [pg.SamplingParams(max_tokens=4, temperature=0),
                                                  pg.SamplingParams(max_tokens=4, temperature=0, cache_prompt=False)])
        assert mixed.stats.prompt_cache_misses + mixed.stats.prompt_cache_hits == 1
        st = pg.stream_parallel(m, prompts[0], max_tokens=4, temperature=0, cache_prompt=False)
        last = [ev for ev in st if ev.finished][0]
        assert last.cached_tokens == 0
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=512, prompt_cache=False) as off:
        assert off.prompt_cache is False and off.numerics()["prompt_cache"] is False
        for _ in range(2):
            r = pg.generate_parallel(off, prompts, **kw)
            assert r.stats.cached_prompt_tokens == 0 and r.stats.prompt_cache_hits == 0
            assert r.stats.prompt_cache_misses == 0
        assert _kv(off) == (0, 0, 0)
    with pytest.raises(TypeError, match="prompt_cache"):
        pg.Model(smollm2_path, prompt_cache=1)
    with pytest.raises(TypeError, match="cache_prompt"):
        pg.SamplingParams(cache_prompt="no")


def test_stream_events_report_cached_tokens(smollm2_path):
    prompt = _prompts()[0]
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=512) as m:
        n = len(m.tokenize(prompt))
        first = [ev for ev in pg.stream_parallel(m, prompt, max_tokens=4, **GREEDY) if ev.finished]
        assert first[0].cached_tokens == 0
        again = [ev for ev in pg.stream_parallel(m, prompt, max_tokens=4, **GREEDY) if ev.finished]
        assert again[0].cached_tokens == n - 1


def test_lru_eviction_across_streams(smollm2_path):
    """Two slots give three KV streams: a fourth distinct prompt evicts the entry used
    least recently, and only that one."""
    topics = ["Astronomy", "Cooking", "Gardening", "Sailing"]  # nothing shared from the first token on
    prompts = [f"{t}: " + f"{t.lower()} is a subject worth studying in detail. " * 8 for t in topics]
    kw = dict(max_tokens=2, **GREEDY)
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256, cache_ram=0) as m:  # streams only (test_kv_host)
        assert _engine(m, lambda e: e.n_streams) == 3

        def cached(p):
            return pg.generate_parallel(m, p, **kw).stats.cached_prompt_tokens

        for p in prompts[:3]:
            assert cached(p) == 0
        assert cached(prompts[0]) > 0  # prompt 0 is now the most recent, prompt 1 the oldest
        evictions = m.stats().prompt_cache_evictions
        assert cached(prompts[3]) == 0
        assert m.stats().prompt_cache_evictions == evictions + 1
        assert cached(prompts[2]) > 0 and cached(prompts[0]) > 0
        assert cached(prompts[1]) == 0  # evicted


def test_eviction_under_a_small_shared_pool_before_any_pause(smollm2_path):
    """A unified KV pool (kv_size) full of cached prompts: new prompts that fit once the
    cache is gone run at once, with no pause and no error; the cache yields first."""
    long_prompts = [f"Story {i}: " + "the quick brown fox jumps over the lazy dog. " * 18 for i in range(4)]
    kw = dict(max_tokens=8, logprobs=2, **GREEDY)
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256, kv_unified=True, kv_size=512) as m:
        cap = _engine(m, lambda e: e.kv_capacity)
        a = pg.generate_parallel(m, long_prompts[:2], **kw)
        assert a.stats.failed == 0
        held = _kv(m)[1]
        assert held > cap // 2  # the pool is mostly cache now
        b = pg.generate_parallel(m, long_prompts[2:], **kw)
        assert b.stats.failed == 0 and b.stats.preemptions == 0
        assert b.stats.prompt_cache_evictions >= 1
        assert _kv(m)[0] == 0 and _kv(m)[1] <= cap
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256, kv_unified=True, kv_size=512, prompt_cache=False) as off:
        ref = pg.generate_parallel(off, long_prompts[2:], **kw)
        assert ref.stats.preemptions == 0
    agree_up_to_near_ties(b, ref)


def test_pause_and_recover_with_cached_kv(smollm2_path):
    """A pool too small for both running sequences: recover() evicts every cache entry
    before it pauses anyone; paused sequences are recomputed and finish whole."""
    prompts = [f"Count {i}: 1, 2, 3," for i in range(2)]
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256, kv_unified=True, kv_size=256) as m:
        pg.generate_parallel(m, _prompts(REVIEWS[:1]), max_tokens=8, **GREEDY)
        assert _kv(m)[1] > 0
        kw = dict(max_tokens=200, logprobs=2, **GREEDY)
        r = pg.generate_parallel(m, prompts, **kw)
        assert r.stats.failed == 0 and [len(c.token_ids) for c in r] == [200, 200]
        assert r.stats.prompt_cache_evictions >= 1 and r.stats.preemptions >= 1
        assert _kv(m)[0] == 0
        alone = [pg.generate_parallel(m, p, **kw)[0] for p in prompts]
    # a paused sequence's prefill is recomputed, cut elsewhere: equal up to near-ties
    agree_up_to_near_ties(r, alone)


def test_cancel_during_a_cached_admission(smollm2_path):
    """A stream whose prompts start from cached KV is closed right after it was admitted:
    nothing leaks, and the cache (and the next calls) are unharmed."""
    prompts = _prompts(REVIEWS[:4])
    kw = dict(max_tokens=8, logprobs=2, **GREEDY)
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512, n_batch=16) as m:
        ref = pg.generate_parallel(m, prompts, **kw)
        for _ in range(3):
            it = pg.stream_parallel(m, _prompts(REVIEWS[4:]), **kw)
            deadline = time.time() + 60
            while _kv(m)[2] == 0 and time.time() < deadline:  # admitted: live sequences
                time.sleep(0.001)
            it.close()
            kv, cached, live = _kv(m)
            assert kv == 0 and live == 0, (kv, cached, live)
            assert m.stats().active_requests == 0
        again = pg.generate_parallel(m, prompts, **kw)
        assert again.stats.failed == 0 and again.stats.prompt_cache_hits == 4
    agree_up_to_near_ties(again, ref)


def test_n_samples_and_classify_reuse_the_cache(smollm2_path):
    prompt = _prompts()[0]
    texts = REVIEWS[:4]
    labels = ["positive", "negative", "neutral"]
    template = INSTRUCTION + "Review: {text}\nSentiment:"
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512) as m:
        pg.generate_parallel(m, prompt, max_tokens=4, **GREEDY)
        r = pg.generate_parallel(m, prompt, n=3, max_tokens=4, temperature=1.0, seed=3)
        assert r.stats.cached_prompt_tokens > 0 and len(r[0].outputs) == 3
        a = pg.classify(m, texts, labels, template=template)
        b = pg.classify(m, texts, labels, template=template)
        assert _kv(m)[0] == 0
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512, prompt_cache=False) as off:
        ref = pg.classify(off, texts, labels, template=template)
    assert a.labels == b.labels == ref.labels
    assert abs(b.probs - ref.probs).max() < 0.05


def test_greedy_share_identical_to_no_cache(smollm2_path):
    """Greedy outputs from a cached 300-token instruction leave the outputs without the
    cache only at near-ties (which tokens are near-tied depends on the CPU's kernels): a
    broken reuse would derail every prompt from its first token."""
    instruction = INSTRUCTION * 3
    prompts = [f"{instruction}Review: {r} ({i})\nSentiment:" for i in range(2) for r in REVIEWS]
    kw = dict(max_tokens=8, logprobs=2, **GREEDY)
    with pg.Model(smollm2_path, n_parallel=8, n_ctx=512) as m:
        pg.generate_parallel(m, f"{instruction}Review: warm-up\nSentiment:", max_tokens=2, **GREEDY)
        got = pg.generate_parallel(m, prompts, **kw)
        assert got.stats.cached_prompt_tokens >= 16 * (len(m.tokenize(instruction)) - 2)
    with pg.Model(smollm2_path, n_parallel=8, n_ctx=512, prompt_cache=False, share_prefix=False) as off:
        ref = pg.generate_parallel(off, prompts, **kw)
    agree_up_to_near_ties(got, ref)


def test_chat_and_file_jobs_reuse_the_cache(smollm2_path, tmp_path):
    """No new call: a conversation's next turn and a file job's rows reuse cached KV."""
    system = {"role": "system", "content": INSTRUCTION}
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=512) as m:
        one = pg.chat_parallel(m, [[system, {"role": "user", "content": "Review: I loved it."}]],
                               max_tokens=6, temperature=0)
        turn = [system, {"role": "user", "content": "Review: I loved it."},
                {"role": "assistant", "content": one[0].text}, {"role": "user", "content": "Why?"}]
        two = pg.chat_parallel(m, [turn], max_tokens=6, temperature=0)
        assert two.stats.cached_prompt_tokens >= one[0].prompt_tokens
        rows = tmp_path / "in.jsonl"
        rows.write_text("".join(json.dumps({"prompt": p, "cache_prompt": i != 3}) + "\n"
                                for i, p in enumerate(_prompts())))
        before = m.stats()
        summary = pg.run_file_job(m, rows, tmp_path / "out.jsonl", max_tokens=2, temperature=0)
        after = m.stats()
        assert summary.written == len(REVIEWS) and summary.failed == 0
        n_instr = len(m.tokenize(INSTRUCTION))
        # The instruction is decoded once (the first row, or a prefix that rows queued
        # together share: its users count no lookup); every other lookup reuses it.
        hits = after.prompt_cache_hits - before.prompt_cache_hits
        assert after.prompt_cache_misses - before.prompt_cache_misses <= 1 and hits >= 3
        assert after.cached_prompt_tokens - before.cached_prompt_tokens >= hits * (n_instr - 2)
        assert _kv(m)[0] == 0
