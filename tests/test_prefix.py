"""Shared-prefix reuse and n samples per prompt."""

from __future__ import annotations

import time

import parallel_gen as pg
from conftest import agree_up_to_near_ties
from parallel_gen.params import sample_seed

INSTRUCTION = ("You are a careful annotator. Read the review below and classify its sentiment as positive, "
               "negative or neutral, then explain your choice in one short sentence. ") * 3
REVIEWS = ["I loved it.", "Terrible service, never again.", "It was fine I guess.", "Best pizza in town!",
           "The plot dragged on.", "Okay value for money.", "Staff were rude.", "Would recommend it."]


def _prompts(prefix=INSTRUCTION, reviews=REVIEWS):
    return [f"{prefix}Review: {r}\nSentiment:" for r in reviews]


def _alone(model, prompts, **kw):
    return [pg.generate_parallel(model, p, **kw)[0] for p in prompts]


def test_shared_prefix_decoded_once(smollm2_path):
    prompts = _prompts() * 2  # 16 prompts, 8 slots: later ones reuse the prefix too
    # logprobs: shared-prefix decoding cuts each prefill at the prefix boundary, which
    # rounds differently (see agree_up_to_near_ties)
    kw = dict(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    # The queue-time prefix alone: with the prompt cache, the queued 8 would reuse the
    # first 8's whole prompts instead (test_prompt_cache).
    with pg.Model(smollm2_path, n_parallel=8, n_ctx=512, prompt_cache=False) as m:
        n_prefix = len(m.tokenize(INSTRUCTION))
        r = pg.generate_parallel(m, prompts, **kw)
        assert r.stats.prefix_tokens_reused >= 16 * (n_prefix - 2)
        # prompt tokens actually decoded: one prefix plus the 16 suffixes
        assert r.stats.prompt_tokens - r.stats.prefix_tokens_reused < n_prefix + 16 * 20
        got = [c.token_ids for c in r]
        assert got[:8] == got[8:]  # reused by the first and the queued prompts alike
        agree_up_to_near_ties(r[:8], _alone(m, prompts[:8], **kw))
        assert [c.token_ids for c in pg.generate_parallel(m, prompts, **kw)] == got  # deterministic
    with pg.Model(smollm2_path, n_parallel=8, n_ctx=512, share_prefix=False, prompt_cache=False) as m:
        off = pg.generate_parallel(m, prompts, **kw)
        assert off.stats.prefix_tokens_reused == 0
        agree_up_to_near_ties(r, off)
    with pg.Model(smollm2_path, n_parallel=8, n_ctx=512) as m:  # with the cache: decoded once too
        again = pg.generate_parallel(m, prompts, **kw)
        s = again.stats
        assert s.prefix_tokens_reused + s.cached_prompt_tokens >= 16 * (n_prefix - 2)
        assert s.prompt_tokens - s.prefix_tokens_reused - s.cached_prompt_tokens < n_prefix + 16 * 20
        agree_up_to_near_ties(again, r)


def test_two_prefix_groups_interleaved(smol):
    a = _prompts()[:4]
    b = _prompts(prefix="Translate the following English review into French, keeping its tone and meaning. " * 3)[:4]
    prompts = [x for pair in zip(a, b) for x in pair]
    kw = dict(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    r = pg.generate_parallel(smol, prompts, **kw)
    assert r.stats.prefix_tokens_reused > 0
    agree_up_to_near_ties(r, _alone(smol, prompts, **kw))


def test_prefix_reuse_in_a_unified_pool(smollm2_path):
    prompts = _prompts()
    kw = dict(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512, kv_unified=True) as m:
        r = pg.generate_parallel(m, prompts, **kw)
        assert r.stats.prefix_tokens_reused > 0 and r.stats.failed == 0
        alone = _alone(m, prompts, **kw)
    # unified KV is not batch-invariant in llama.cpp either
    agree_up_to_near_ties(r, alone)


def test_prefix_reuse_on_sliding_window_gemma(gemma3_path):
    prompts = _prompts()[:6]
    kw = dict(max_tokens=10, temperature=0, ignore_eos=True)
    # The queue-time prefix alone (with the cache the samples reuse other cached prompts,
    # whose suffixes Gemma computes in other batch shapes: not bitwise equal).
    with pg.Model(gemma3_path, n_parallel=3, n_ctx=512, prompt_cache=False) as m:
        r = pg.generate_parallel(m, prompts, **kw)
        assert r.stats.prefix_tokens_reused > 0
        # n greedy samples of one prompt share its copied KV: all identical
        s = pg.generate_parallel(m, prompts[0], n=3, **kw)[0]
        assert len({tuple(o.token_ids) for o in s.outputs}) == 1
        assert s.outputs[0].token_ids[:3] == r[0].token_ids[:3]
        # the next call, without a shared prefix, is unaffected by the copies
        fresh = pg.generate_parallel(m, ["The sky is"], **kw)[0]
    with pg.Model(gemma3_path, n_parallel=3, n_ctx=512, prompt_cache=False) as m2:
        assert pg.generate_parallel(m2, ["The sky is"], **kw)[0].token_ids == fresh.token_ids


def test_n_samples(smollm2_path):
    prompt = INSTRUCTION + "Review: The food was cold.\nSentiment:"
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512) as m:
        r = pg.generate_parallel(m, [prompt, "Hi"], n=10, max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
        c = r[0]
        assert len(c.outputs) == 10 and c.completion_tokens == 120
        assert len({tuple(o.token_ids) for o in c.outputs}) >= 8  # own seeds: different samples
        assert len(r[1].outputs) == 10
        assert r.stats.prefix_tokens_reused > 0  # n > n_parallel: queued samples reuse it too
        # sample j uses sample_seed(seed_i, j): reproduce two of them one by one
        for j in (0, 7):
            one = pg.generate_parallel(m, prompt, max_tokens=12, temperature=1.0, seed=sample_seed(5, j),
                                       ignore_eos=True)[0]
            assert one.token_ids == c.outputs[j].token_ids
        again = pg.generate_parallel(m, [prompt, "Hi"], n=10, max_tokens=12, temperature=1.0, seed=5,
                                     ignore_eos=True)
        assert [o.token_ids for o in again[0].outputs] == [o.token_ids for o in c.outputs]


def test_n_samples_of_a_bad_prompt_all_error(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=32) as m:
        r = pg.generate_parallel(m, ["word " * 100, "Hi"], n=3, max_tokens=4)
        assert [o.finish_reason for o in r[0].outputs] == ["error"] * 3
        assert all(o.finish_reason != "error" for o in r[1].outputs)
        assert r.stats.failed == 1


def _kv_and_live(model):
    return model._require_runner().run_on_engine(lambda e: (e.kv_tokens, e.n_live))


def test_cancel_while_the_shared_prefix_is_being_decoded(smollm2_path):
    """A stream whose prompts share a long prefix is closed while that prefix is still
    being decoded (no prompt admitted yet): its KV goes too, and the next calls, with and
    without that prefix, run as on a fresh Model."""
    prompts = _prompts(prefix=INSTRUCTION * 2)[:4]
    kw = dict(max_tokens=6, temperature=0, ignore_eos=True)
    # n_batch=16: the ~200-token prefix takes a dozen steps, a window to cancel in
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512, n_batch=16) as m:
        it = pg.stream_parallel(m, prompts, **kw)
        deadline = time.time() + 60
        while True:  # between two steps: some prefix KV, no sequence running yet
            kv, live = _kv_and_live(m)
            if kv > 0 or time.time() > deadline:
                break
        assert kv > 0 and live == 0, (kv, live)
        it.close()
        assert _kv_and_live(m) == (0, 0)
        s = m.stats()
        assert s.active_requests == 0 and s.queued_prompts == 0
        after = pg.generate_parallel(m, prompts, **kw)
        plain = pg.generate_parallel(m, ["The sky is"], **kw)[0]
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512, n_batch=16) as fresh:
        ref = pg.generate_parallel(fresh, prompts, **kw)
        assert pg.generate_parallel(fresh, ["The sky is"], **kw)[0].token_ids == plain.token_ids
    assert after.stats.prefix_tokens_reused > 0
    assert [c.token_ids for c in after] == [c.token_ids for c in ref]
