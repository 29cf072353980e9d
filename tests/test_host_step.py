"""The engine's work between two decodes (issue 27): n_parallel up to llama.cpp's sequence
limit, host time reported, and the vectorized / multi-threaded sampling path giving the
tokens llama.cpp's own samplers give."""

from __future__ import annotations

import pytest

import parallel_gen as pg
from conftest import PROMPTS_16
from parallel_gen._native import _core

LIMIT = int(_core.max_parallel_sequences())


def test_n_parallel_at_llama_cpp_limit_loads_with_default_settings(smollm2_path):
    """The prompt cache's extra stream is dropped at the limit (it used to ask for limit + 1
    streams and fail to load); prefixes and the cache then live in free slots."""
    cfg = pg.ModelConfig(n_parallel=LIMIT, n_ctx=64)
    assert cfg.prompt_cache and cfg.share_prefix and cfg.kv_streams == LIMIT
    assert pg.ModelConfig(n_parallel=LIMIT - 1, n_ctx=64).kv_streams == LIMIT
    prompts = [f"Item {i}: the capital of France is" for i in range(LIMIT)]
    kw = dict(max_tokens=3, temperature=0, ignore_eos=True)
    with pg.Model(smollm2_path, n_parallel=LIMIT, n_ctx=64) as m:
        r = pg.generate_parallel(m, prompts, **kw)
        assert r.stats.failed == 0 and all(len(c.token_ids) == 3 for c in r)
        again = pg.generate_parallel(m, prompts[:8], **kw)  # the cache kept them in free slots
        assert again.stats.cached_prompt_tokens > 0
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=64, prompt_cache=False) as small:
        alone = pg.generate_parallel(small, prompts[:2] + prompts[-2:], **kw)
    assert [c.token_ids for c in alone] == [c.token_ids for c in list(r)[:2] + list(r)[-2:]]


def test_n_parallel_above_the_limit_is_a_param_error_before_loading(tmp_path):
    before = _core.engines_alive()
    with pytest.raises(pg.ParamError, match=f"n_parallel={LIMIT + 1}.*{LIMIT}") as e:
        pg.Model(tmp_path / "absent.gguf", n_parallel=LIMIT + 1)
    assert e.value.field == "n_parallel"
    assert _core.engines_alive() == before


def test_host_seconds_reported_per_call_and_in_totals(smol):
    before = smol.stats().host_seconds
    r = pg.generate_parallel(smol, PROMPTS_16, max_tokens=6, temperature=0, ignore_eos=True)
    s = r.stats
    assert 0 < s.host_seconds < s.wall_seconds - s.prompt_seconds - s.generation_seconds + 1e-3
    assert s.host_ms_per_step == pytest.approx(1000 * s.host_seconds / s.decode_calls)
    assert smol.stats().host_seconds - before == pytest.approx(s.host_seconds)


def _tokens(result):
    return [c.token_ids for c in result]


def test_top_k_prefilter_samples_what_llama_cpp_samples(smol):
    """A chain starting with top-k gets only the k best logits instead of the vocabulary; a
    zero logit bias (a no-op that sends sampling through llama.cpp's own full-vocabulary
    path) must give the same tokens for the same seeds."""
    prompts = PROMPTS_16[:8]
    for extra in (dict(top_k=40, top_p=0.95, min_p=0.05), dict(top_k=5, top_p=1.0, min_p=0.0),
                  dict(top_k=200, top_p=0.9)):
        kw = dict(max_tokens=24, temperature=0.9, seed=11, ignore_eos=True, **extra)
        fast = pg.generate_parallel(smol, prompts, **kw)
        full = pg.generate_parallel(smol, prompts, logit_bias={0: 0.0}, **kw)
        assert _tokens(fast) == _tokens(full), extra
        assert len({tuple(t) for t in _tokens(fast)}) == len(prompts)  # really sampled
        assert _tokens(pg.generate_parallel(smol, prompts, **kw)) == _tokens(fast)  # reproducible


def test_greedy_argmax_is_llama_cpp_greedy_and_the_top_logprob(smol, gemma):
    for m in (smol, gemma):
        kw = dict(max_tokens=12, temperature=0, ignore_eos=True)
        plain = pg.generate_parallel(m, PROMPTS_16, logprobs=1, **kw)
        chain = pg.generate_parallel(m, PROMPTS_16, logit_bias={0: 0.0}, **kw)  # llama.cpp's greedy sampler
        assert _tokens(plain) == _tokens(chain)
        for c in plain:
            assert [t.top[0].token_id for t in c.outputs[0].logprobs] == c.token_ids


def test_rows_sampled_on_several_threads_match_one_at_a_time(smollm2_path):
    """Each sequence draws from its own sampler and logits row, whichever thread runs it:
    16 seeded samples (and a grammar-constrained one beside them) batched equal the same
    prompts run alone (SmolLM2 with separate KV streams is batch-invariant)."""
    grammar = 'root ::= ("yes" | "no") "."'
    params = [pg.SamplingParams(max_tokens=16, temperature=1.0, top_k=0, top_p=0.9, seed=100 + i,
                                ignore_eos=True, logprobs=2) for i in range(16)]
    params[5] = pg.SamplingParams(max_tokens=8, temperature=0.7, seed=7, grammar=grammar)
    with pg.Model(smollm2_path, n_parallel=16, n_ctx=128, n_threads=2, prompt_cache=False,
                  share_prefix=False) as m:
        batched = pg.generate_parallel(m, PROMPTS_16, params)
        alone = [pg.generate_parallel(m, p, q)[0] for p, q in zip(PROMPTS_16, params)]
    assert _tokens(batched) == [c.token_ids for c in alone]
    assert batched[5].text in ("yes.", "no.")
    for b, a in zip(batched, alone):
        if b.outputs[0].logprobs:
            assert [t.logprob for t in b.outputs[0].logprobs] == pytest.approx(
                [t.logprob for t in a.outputs[0].logprobs], abs=1e-5)


# -- backend sampling: samplers with a backend form run in llama.cpp's graph ---------------

def _tokens_of(result):
    return [c.token_ids for c in result]


def test_backend_sampling_greedy_matches_host_and_seeded_draws_reproduce(smollm2_path):
    """Greedy in the graph picks the host's tokens; a seeded draw in the graph is the same
    run to run (it takes other random numbers than the host's: not compared with it). With
    4 slots and uneven lengths sequences leave and join, and live ones move streams to
    close gaps: each chain follows its sequence (llama.cpp initializes a chain once: a
    moved one is attached as a clone)."""
    prompts = PROMPTS_16[:12]
    greedy = [pg.SamplingParams(max_tokens=4 + 3 * (i % 5), temperature=0, ignore_eos=True) for i in range(12)]
    drawn = [pg.SamplingParams(max_tokens=4 + 3 * (i % 5), temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                               seed=10 + i, ignore_eos=True) for i in range(12)]
    kw = dict(n_parallel=4, n_ctx=128, n_threads=2)
    with pg.Model(smollm2_path, backend_sampling=False, **kw) as host:
        on_host = pg.generate_parallel(host, prompts, greedy)
    with pg.Model(smollm2_path, backend_sampling=True, **kw) as m:
        assert m.config.backend_sampling is True
        g = pg.generate_parallel(m, prompts, greedy)
        d1 = pg.generate_parallel(m, prompts, drawn)
        d2 = pg.generate_parallel(m, prompts, drawn)
    assert _tokens_of(g) == _tokens_of(on_host)
    assert g.stats.sequence_moves + d1.stats.sequence_moves > 0  # the clone path ran
    assert _tokens_of(d1) == _tokens_of(d2)
    total = sum(p.max_tokens for p in greedy)
    assert g.stats.backend_sampled_tokens == total == d1.stats.backend_sampled_tokens
    assert on_host.stats.backend_sampled_tokens == 0
    assert len({tuple(t) for t in _tokens_of(d1)}) > 1


def test_backend_sampling_leaves_host_only_requests_on_the_host_in_the_same_batch(smollm2_path):
    """A grammar, logprobs, logit_bias and penalties need the host's path: in one batch
    beside backend-sampled prompts they keep their constraints and outputs (equal to a
    Model without backend sampling), and only the others count as backend-sampled; a
    scoring request (many outputs of one sequence per decode) scores as without it."""
    params = [
        pg.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),                        # backend
        pg.SamplingParams(max_tokens=8, temperature=0.7, seed=3, grammar='root ::= ("yes" | "no") "."'),
        pg.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2),
        pg.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, repeat_penalty=1.3),
        pg.SamplingParams(max_tokens=5, temperature=0.9, seed=4, ignore_eos=True),              # backend
    ]
    kw = dict(n_parallel=6, n_ctx=128, n_threads=2)
    with pg.Model(smollm2_path, backend_sampling=False, **kw) as host:
        ban = host.tokenize(" Paris", add_special=False)[0]
        params.append(pg.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={ban: -100.0}))
        prompts = ["The capital of France is"] * 2 + PROMPTS_16[:3] + ["The capital of France is"]
        ref = pg.generate_parallel(host, prompts, params)
        ref_scores = pg.score(host, PROMPTS_16[:2], [" yes", " no thanks"])
    with pg.Model(smollm2_path, backend_sampling=True, **kw) as m:
        r = pg.generate_parallel(m, prompts, params)
        scores = pg.score(m, PROMPTS_16[:2], [" yes", " no thanks"])
    assert r.stats.backend_sampled_tokens == 6 + 5
    assert r[1].text in ("yes.", "no.")
    assert ban not in r[5].token_ids
    for i in (0, 2, 3, 5):  # greedy, on the host or in the graph
        assert r[i].token_ids == ref[i].token_ids, i
    assert [t.logprob for t in r[2].outputs[0].logprobs] == pytest.approx(
        [t.logprob for t in ref[2].outputs[0].logprobs], abs=1e-5)
    assert [s.logprob for row in scores for s in row] == pytest.approx(
        [s.logprob for row in ref_scores for s in row], abs=1e-4)


def test_backend_sampling_setting_auto_and_its_errors():
    from parallel_gen._native import llama_cpp

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    assert pg.ModelConfig().backend_sampling is None  # auto
    assert pg.ModelConfig().samples_on_backend is False  # no layers offloaded
    assert pg.ModelConfig(n_gpu_layers=-1).samples_on_backend is gpu
    assert pg.ModelConfig(backend_sampling=True).samples_on_backend is True
    assert "backend_sampling" in pg.ModelConfig().numerics()
    with pytest.raises(pg.ParamError, match="batch_invariant") as e:
        pg.ModelConfig(backend_sampling=True, batch_invariant=True)
    assert e.value.field == "backend_sampling"
    assert pg.ModelConfig(batch_invariant=True, n_gpu_layers=-1).samples_on_backend is False
    with pytest.raises(TypeError, match="backend_sampling"):
        pg.ModelConfig(backend_sampling="yes")
