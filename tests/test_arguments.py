"""Bad arguments fail fast with TypeError/ValueError naming the culprit, before any work."""

from __future__ import annotations

import dataclasses
import math

import pytest

import parallel_gen as pg
from parallel_gen.cli import options
from parallel_gen._native import _core


@pytest.mark.parametrize(
    "field, value, exc, match",
    [
        ("max_tokens", 0, ValueError, "max_tokens=0"),
        ("max_tokens", -5, ValueError, "max_tokens"),
        ("max_tokens", 2.5, TypeError, "max_tokens must be an int"),
        ("max_tokens", True, TypeError, "max_tokens must be an int"),
        ("temperature", -0.1, ValueError, "temperature=-0.1"),
        ("temperature", math.nan, ValueError, "temperature=nan"),
        ("temperature", math.inf, ValueError, "finite"),
        ("temperature", "hot", TypeError, "temperature must be a number"),
        ("top_p", 0.0, ValueError, r"top_p=0.0: must be in \(0, 1\]"),
        ("top_p", 1.5, ValueError, "top_p"),
        ("min_p", -0.01, ValueError, "min_p"),
        ("min_p", 1.01, ValueError, "min_p"),
        ("top_k", -1, ValueError, "top_k=-1"),
        ("repeat_penalty", 0.0, ValueError, "repeat_penalty"),
        ("repeat_last_n", -2, ValueError, "repeat_last_n"),
        ("frequency_penalty", math.nan, ValueError, "frequency_penalty"),
        ("seed", -1, ValueError, "seed=-1"),
        ("seed", 2**32, ValueError, "seed"),
        ("seed", "42", TypeError, "seed must be an int"),
        ("stop", [""], ValueError, "must not hold empty strings"),
        ("stop", [3], TypeError, r"stop\[0\] must be a str"),
        ("stop_token_ids", ["a"], TypeError, r"stop_token_ids\[0\]"),
        ("stop_token_ids", [-3], ValueError, "stop_token_ids"),
        ("ignore_eos", 1, TypeError, "ignore_eos must be a bool"),
    ],
)
def test_sampling_params_rejects(field, value, exc, match):
    with pytest.raises(exc, match=match):
        pg.SamplingParams(**{field: value})


def test_sampling_params_normalizes():
    p = pg.SamplingParams(stop="END", stop_token_ids=7, temperature=0)
    assert p.stop == ("END",) and p.stop_token_ids == (7,)
    assert isinstance(p.temperature, float)
    assert p.replace(max_tokens=3).max_tokens == 3
    with pytest.raises(TypeError, match="unknown SamplingParams field"):
        p.replace(max_token=3)
    with pytest.raises(ValueError):
        p.replace(max_tokens=0)


@pytest.mark.parametrize(
    "prompts, exc, match",
    [
        ([1, 2], TypeError, r"prompts\[0\] must be a str, got int"),
        (["ok", None], TypeError, r"prompts\[1\] must be a str, got NoneType"),
        (b"bytes", TypeError, "got bytes"),
        (42, TypeError, "prompts must be str or a sequence"),
    ],
)
def test_bad_prompts(smol, prompts, exc, match):
    with pytest.raises(exc, match=match):
        pg.generate_parallel(smol, prompts)


@pytest.mark.parametrize(
    "prompts, match",
    [
        ({"q1": "Hello", "q2": "Hi"}, r"got dict: .*list\(d\.values\(\)\)"),
        ({"Hello", "Hi"}, "got set, which has no order"),
        (frozenset({"Hello"}), "got frozenset"),
        ({"q1": "Hello"}.keys(), "got dict_keys"),
    ],
)
def test_unordered_prompts_are_rejected(smol, prompts, match):
    """A dict would be iterated for its keys (generating for the ids), a set in no
    defined order: every entry point says what to pass instead, before any work."""
    with pytest.raises(TypeError, match=match):
        pg.generate_parallel(smol, prompts, max_tokens=2)
    with pytest.raises(TypeError, match=match):
        pg.stream_parallel(smol, prompts, max_tokens=2)
    with pytest.raises(TypeError, match=match):
        pg.astream_parallel(smol, prompts, max_tokens=2)
    s = smol.stats()
    assert s.active_requests == 0 and s.queued_prompts == 0


def test_unordered_params_and_conversations_are_rejected(smol):
    with pytest.raises(TypeError, match="params must be a sequence.*got dict"):
        pg.generate_parallel(smol, ["a"], {"a": pg.SamplingParams()})
    with pytest.raises(TypeError, match="conversations must be a sequence.*got frozenset"):
        pg.chat_parallel(smol, frozenset({(("role", "user"),)}))


def test_params_generator_with_cache(smol, tmp_path):
    """params may be any iterable, a generator included, also with a cache (which reads
    the parameters twice: once to run, once to decide what is cacheable)."""
    def params():
        return (pg.SamplingParams(max_tokens=3 + i, temperature=0, ignore_eos=True) for i in range(2))

    first = pg.generate_parallel(smol, ["Hello", "The sky is"], params(), cache=tmp_path / "cache")
    assert [len(c.token_ids) for c in first] == [3, 4] and first.stats.cache_hits == 0
    again = pg.generate_parallel(smol, ["Hello", "The sky is"], params(), cache=tmp_path / "cache")
    assert again.stats.cache_hits == 2 and [c.token_ids for c in again] == [c.token_ids for c in first]


def test_bad_call_arguments(smol):
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        pg.generate_parallel(smol, ["a", "b"], [pg.SamplingParams()])
    with pytest.raises(TypeError, match=r"params\[1\] must be a SamplingParams"):
        pg.generate_parallel(smol, ["a", "b"], [pg.SamplingParams(), {"max_tokens": 3}])
    with pytest.raises(TypeError, match="unknown sampling option.*max_token"):
        pg.generate_parallel(smol, ["a"], max_token=3)
    with pytest.raises(ValueError, match="max_tokens=0"):
        pg.generate_parallel(smol, ["a"], max_tokens=0)
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        pg.generate_parallel(smol, ["a"], stop_token_ids=[10**7])
    with pytest.raises(TypeError, match="model must be"):
        pg.generate_parallel(3.14, ["a"])


def test_empty_prompt_list_gives_empty_result(smol):
    r = pg.generate_parallel(smol, [])
    assert len(r) == 0 and r.texts == [] and r.stats.prompts == 0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(n_parallel=0), ValueError, "n_parallel=0"),
        (dict(n_parallel=2.0), TypeError, "n_parallel must be an int"),
        (dict(n_parallel=10**6), ValueError, "n_parallel"),
        (dict(n_ctx=4), ValueError, "n_ctx=4"),
        (dict(n_batch=4, n_parallel=8), ValueError, "n_batch=4 must be >= n_parallel=8"),
        (dict(n_threads=0), ValueError, "n_threads=0"),
        (dict(type_k="q9"), ValueError, "type_k='q9'"),
        (dict(flash_attn="yes"), ValueError, "flash_attn='yes'"),
        (dict(kv_size=1024), ValueError, "only meaningful with kv_unified=True"),
        (dict(kv_unified=True, kv_size=64, n_ctx=512), ValueError, "kv_size=64 must be >= n_ctx=512"),
        (dict(n_gpu_layers=-2), ValueError, "n_gpu_layers"),
    ],
)
def test_bad_model_settings(smollm2_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pg.Model(smollm2_path, **kwargs)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        pg.Model(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        pg.generate_parallel(str(tmp_path / "nope.gguf"), ["hi"])


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a model at all" * 100)
    with pytest.raises(pg.ModelLoadError, match="not a GGUF"):
        pg.Model(bad)
    with pytest.raises(pg.ModelLoadError, match="directory"):
        pg.Model(tmp_path)
    assert issubclass(pg.ModelLoadError, ValueError)


def test_truncated_gguf(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(1 << 20))  # a real header, most tensors missing
    with pytest.raises(pg.ModelLoadError, match="could not load"):
        pg.Model(cut)


def test_closed_model(smollm2_path):
    m = pg.Model(smollm2_path, n_parallel=1, n_ctx=64)
    m.close()
    m.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pg.generate_parallel(m, ["hi"])


def test_sampling_fields_have_one_source_of_truth():
    """SamplingParams is the source: every field is a CLI flag, and every field the
    engine reads is a native SamplingConfig attribute that to_native fills in."""
    fields = [f.name for f in dataclasses.fields(pg.SamplingParams)]
    assert [f for f, *_ in options.SAMPLING_FLAGS] == fields
    # resolved in Python: n becomes n engine sequences; json_schema and choices compile to a grammar
    python_only = {"n", "json_schema", "choices"}
    # set by score()/classify(), not a sampling setting: the forced continuations to score
    scoring_only = {"continuations"}
    native = {k for k, v in vars(_core.SamplingConfig).items() if isinstance(v, property)}
    assert native - scoring_only == set(fields) - python_only
    # every native attribute carries its field's value (none left at the C++ default)
    p = pg.SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, repeat_penalty=1.2,
                          repeat_last_n=16, frequency_penalty=0.3, presence_penalty=0.4, seed=5, stop=["x"],
                          stop_token_ids=[2], ignore_eos=True, grammar='root ::= "a"', logprobs=2,
                          logit_bias={3: 1.5})
    c = p.to_native(seed=99)
    for name in sorted(native - scoring_only - {"seed"}):
        want = getattr(p, name)
        want = sorted(want.items()) if isinstance(want, dict) else list(want) if isinstance(want, tuple) else want
        assert getattr(c, name) == (pytest.approx(want, rel=1e-6) if isinstance(want, float) else want), name
    assert c.seed == 99  # the per-sample seed, resolved by the caller
    for name, value in [("temperature", 0.0), ("logprobs", None), ("grammar", None), ("ignore_eos", False)]:
        assert getattr(pg.SamplingParams(**{name: value}).to_native(seed=1), name) != getattr(c, name), name
