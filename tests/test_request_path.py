"""The one request path (issue 20): typed errors and codes, the engine thread's crash
barrier, the result cache key, resources freed on close, ModelConfig as the one source
of Model settings. Each bug test failed on the code before the fix."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading

import pytest

import parallel_gen as pg
from parallel_gen.core import events, inputs
from parallel_gen._native import _core
from parallel_gen.errors import ErrorCode, Failure

from conftest import PROMPTS_16


def _in_thread(fn, timeout=120.0):
    """fn() on a thread; its result or exception, or a test failure if it hangs."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} did not return within {timeout} s: a caller is stuck"
    return box


# -- bug 1: the engine thread's crash barrier -------------------------------------------
def test_a_failing_engine_thread_fails_every_caller_and_breaks_the_model(smollm2_path, monkeypatch):
    """An exception escaping the engine loop used to kill the thread and leave every caller
    waiting forever; now each gets EngineFailedError, the Model says it is broken, later
    calls fail at once and close() returns."""
    m = pg.Model(smollm2_path, n_parallel=2, n_ctx=256, n_threads=2)
    try:
        def boom(cls, native):
            raise RuntimeError("boom in the engine loop")

        stream = pg.stream_parallel(m, ["Once upon a time"], max_tokens=200, temperature=0, ignore_eos=True)
        monkeypatch.setattr(events.EngineCounters, "from_native", classmethod(boom))
        got = _in_thread(lambda: pg.generate_parallel(m, PROMPTS_16[:3], max_tokens=8, temperature=0))
        assert isinstance(got.get("error"), pg.EngineFailedError), got
        assert isinstance(got["error"], pg.GenerationError) and "boom in the engine loop" in str(got["error"])
        streamed = _in_thread(lambda: list(stream))
        assert isinstance(streamed.get("error"), pg.EngineFailedError), streamed
        assert m.failure is not None and "boom" in m.failure
        with pytest.raises(pg.EngineFailedError):  # a broken Model refuses new work at once
            pg.generate_parallel(m, ["Hi"], max_tokens=2)
    finally:
        closed = _in_thread(m.close, timeout=60)
    assert "error" not in closed and m.closed


def test_async_callers_get_the_engine_failure_too(smollm2_path, monkeypatch):
    m = pg.Model(smollm2_path, n_parallel=2, n_ctx=256, n_threads=2)

    async def consume():
        return [ev async for ev in pg.astream_parallel(m, ["Hello there"], max_tokens=30, temperature=0)]

    try:
        monkeypatch.setattr(events.Delta, "from_native", classmethod(lambda cls, d: 1 / 0))
        got = _in_thread(lambda: asyncio.run(consume()))
        assert isinstance(got.get("error"), pg.EngineFailedError), got
    finally:
        m.close()


# -- typed errors -----------------------------------------------------------------------
def test_prompt_errors_carry_codes(smol):
    long = " ".join(["word"] * 600)
    r = pg.generate_parallel(smol, ["", long, "\ud800 broken", "The capital of France is"], max_tokens=3,
                             temperature=0)
    assert [c.error_code for c in r] == [ErrorCode.EMPTY_PROMPT, ErrorCode.PROMPT_TOO_LONG,
                                         ErrorCode.INVALID_PROMPT, None]
    assert r[1].error_code == "prompt_too_long" and f"{r[1].error_code}" == "prompt_too_long"
    assert all(c.finish_reason == "error" and c.error for c in r[:3]) and r[3].finish_reason == "length"
    # the same codes through a stream and generate_iter
    ends = [ev for ev in pg.stream_parallel(smol, ["", long], max_tokens=2) if ev.finished]
    assert sorted(ev.error_code for ev in ends) == sorted([ErrorCode.EMPTY_PROMPT, ErrorCode.PROMPT_TOO_LONG])
    assert [c.error_code for c in pg.generate_iter(smol, ["", "ok"], max_tokens=2)] == [ErrorCode.EMPTY_PROMPT, None]
    # scoring: a text whose prompt + label does not fit
    s = pg.score(smol, [long, "The sky is"], [" yes"])
    assert [x[0].error_code for x in s] == [ErrorCode.PROMPT_TOO_LONG, None]


def test_model_checks_a_prompt_with_the_engines_rule(smol):
    assert smol.check_tokens(smol.tokenize("Hello")) is None
    assert smol.check_tokens([]) == Failure(ErrorCode.EMPTY_PROMPT, smol.check_tokens([]).message)
    too_long = smol.check_tokens([1] * smol.n_ctx)
    assert too_long.code is ErrorCode.PROMPT_TOO_LONG and "n_ctx=512" in too_long.message
    assert smol.check_tokens([smol.n_vocab + 5]).code is ErrorCode.INVALID_PROMPT
    assert smol.check_tokens([1, 2], [[3] * 600]).code is ErrorCode.PROMPT_TOO_LONG  # a scored continuation


def test_param_errors_name_their_field():
    with pytest.raises(pg.ParamError) as e:
        pg.SamplingParams(top_p=0)
    assert e.value.field == "top_p" and isinstance(e.value, ValueError)
    with pytest.raises(pg.ParamTypeError) as t:
        pg.SamplingParams(max_tokens="many")
    assert t.value.field == "max_tokens" and isinstance(t.value, TypeError)
    with pytest.raises(pg.ParamError) as c:
        pg.ModelConfig(n_parallel=4, n_batch=2)
    assert c.value.field == "n_batch"
    with pytest.raises(pg.ParamTypeError) as u:
        pg.ModelConfig().replace(n_paralel=4)
    assert u.value.field == "n_paralel" and "n_parallel" in str(u.value)


def test_closed_model_raises_model_closed_error(smollm2_path):
    m = pg.Model(smollm2_path, n_parallel=1, n_ctx=128, n_threads=2)
    m.close()
    with pytest.raises(pg.ModelClosedError):
        pg.generate_parallel(m, ["Hi"], max_tokens=2)


def test_closing_the_model_under_a_waiting_call_raises_model_closed_error(smollm2_path):
    m = pg.Model(smollm2_path, n_parallel=1, n_ctx=256, n_threads=2)
    stream = pg.stream_parallel(m, ["Once upon a time"], max_tokens=200, temperature=0, ignore_eos=True)
    next(stream)
    m.close()
    got = _in_thread(lambda: list(stream))
    assert isinstance(got.get("error"), pg.ModelClosedError), got


# -- bug 6: the result cache key holds numerics, not capacity ----------------------------
def test_result_cache_hits_after_the_context_was_sized_differently(smollm2_path, tmp_path):
    """generate_parallel(path) sizes n_ctx per call; the key used to include n_ctx, so a
    second call with a longer companion prompt missed every cached prompt."""
    first = pg.generate_parallel(smollm2_path, ["Hi"], max_tokens=4, temperature=0, cache=tmp_path)
    second = pg.generate_parallel(smollm2_path, ["Hi", " ".join(["long"] * 300)], max_tokens=4, temperature=0,
                                  cache=tmp_path)
    assert second.stats.cache_hits == 1 and second[0].text == first[0].text
    # an output the context cut short is not stored: under a larger context it would go on
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=16, n_threads=2) as tiny:
        cut = pg.generate_parallel(tiny, ["Once upon a time"], max_tokens=40, temperature=0, ignore_eos=True,
                                   cache=tmp_path)
        assert cut[0].finish_reason == "length" and len(cut[0].token_ids) < 40
    again = pg.generate_parallel(smollm2_path, ["Once upon a time"], max_tokens=40, temperature=0, ignore_eos=True,
                                 cache=tmp_path)
    assert again.stats.cache_hits == 0 and len(again[0].token_ids) == 40


def test_numerics_leave_capacity_out(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256, n_threads=2) as a, \
            pg.Model(smollm2_path, n_parallel=3, n_ctx=512, n_threads=1) as b:
        assert a.numerics() == b.numerics()
        assert pg.generate_parallel(a, ["Water boils at"], max_tokens=12, temperature=0).texts == \
            pg.generate_parallel(b, ["Water boils at"], max_tokens=12, temperature=0).texts
    assert set(pg.ModelConfig().numerics()) == {"n_batch", "n_gpu_layers", "kv_unified", "flash_attn", "type_k",
                                                "type_v", "kv_size", "share_prefix", "prompt_cache", "cache_ram",
                                                "batch_invariant", "backend_sampling"}


# -- bug 7: a Model's engine is freed by close(), whatever still refers to it --------------
def test_an_unexhausted_generate_iter_does_not_keep_the_engine_alive(smollm2_path):
    gc.collect()
    before = _core.engines_alive()
    m = pg.Model(smollm2_path, n_parallel=2, n_ctx=128, n_threads=2)
    assert _core.engines_alive() == before + 1
    it = pg.generate_iter(m, (f"Prompt {i}" for i in range(100)), max_tokens=4)
    next(it)  # suspended with requests in flight
    m.close()
    gc.collect()
    assert _core.engines_alive() == before  # the context (and its KV) is gone
    with pytest.raises(pg.GenerationError):
        list(it)


# -- ModelConfig is the one source of Model settings --------------------------------------
def test_model_config_is_the_models_settings(smollm2_path):
    cfg = pg.ModelConfig(n_parallel=2, n_ctx=128, n_threads=2, share_prefix=False)
    with pg.Model(smollm2_path, cfg, n_batch=64) as m:
        assert m.config == dataclasses.replace(cfg, n_batch=64)
        assert (m.n_parallel, m.n_ctx, m.n_batch, m.n_threads, m.share_prefix) == (2, 128, 64, 2, False)
    with pg.Model(smollm2_path, n_parallel=1, n_threads=2) as d:  # n_ctx resolved when the Model opens
        assert d.config.n_ctx == d.n_ctx and d.n_ctx > 0
    with pytest.raises(TypeError, match="unknown Model setting"):
        pg.Model(smollm2_path, n_paralel=2)


def test_seed_rule_is_the_same_everywhere(smol):
    """seed s gives prompt (row, item) i the seed s + i: generate_parallel, generate_iter,
    per-prompt params and the server all follow params.SeedRule."""
    params = inputs.param_list(None, {"seed": 2**32 - 1, "temperature": 0.9}, 3)
    assert [p.seed for p in params] == [2**32 - 1, 0, 1]
    prompts = ["Tell me a story.", "Tell me a story.", "Name a colour."]
    batch = pg.generate_parallel(smol, prompts, max_tokens=10, temperature=0.9, seed=7).texts
    lazy = [c.text for c in pg.generate_iter(smol, prompts, max_tokens=10, temperature=0.9, seed=7)]
    alone = [pg.generate_parallel(smol, p, max_tokens=10, temperature=0.9, seed=7 + i).texts[0]
             for i, p in enumerate(prompts)]
    assert batch == lazy == alone


# -- bug 8: no asserts for invariants; a clear error for an unreadable key file ------------
def test_the_library_checks_invariants_without_assert():
    """`assert` vanishes under python -O: invariants are checked with explicit raises."""
    import ast
    from pathlib import Path

    offenders = []
    for path in Path(pg.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assert):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_serve_with_an_unreadable_api_key_file_is_a_clear_error(tmp_path, smollm2_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "parallel_gen", "serve", "-m", str(smollm2_path), "--port", "0",
                        "--api-key-file", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--api-key-file" in r.stderr and "cannot read it" in r.stderr and "Traceback" not in r.stderr
