"""One libllama per process, shared with llama_cpp; weights shared by from_llama."""

from __future__ import annotations

import os

import llama_cpp
import pytest

import parallel_gen as pg
from parallel_gen._native import _core

from conftest import rss_bytes


def _mapped(substring: str) -> set:
    paths = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and substring in parts[5]:
                paths.add(os.path.realpath(parts[5]))
    return paths


def _file_rss(path: str) -> int:
    """Resident bytes of all mappings of one file in this process."""
    total, inside = 0, False
    real = os.path.realpath(path)
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping header
                inside = len(parts) >= 6 and os.path.realpath(parts[5]) == real
            elif inside and parts[0] == "Rss:":
                total += int(parts[1]) * 1024
    return total


def test_one_libllama_shared_with_llama_cpp(smollm2_path):
    llm = pg.load_llama(str(smollm2_path), n_ctx=256, verbose=False)
    llm.create_completion("Hello", max_tokens=2)
    with pg.Model.from_llama(llm, n_parallel=2, n_ctx=256) as m:
        pg.generate_parallel(m, ["Hello"], max_tokens=2)
    libs = _mapped("libllama")
    assert len(libs) == 1, libs
    ours = os.path.realpath(_core.libllama_path())
    assert libs == {ours}
    assert os.path.dirname(ours) == os.path.realpath(os.path.join(os.path.dirname(llama_cpp.__file__), "lib"))


def test_from_llama_shares_the_weights(smollm2_path):
    llm = pg.load_llama(str(smollm2_path), n_ctx=256, verbose=False)
    llm.create_completion("Warm up every weight page", max_tokens=4)
    size = os.path.getsize(smollm2_path)
    file_rss = _file_rss(smollm2_path)
    rss0 = rss_bytes()
    with pg.Model.from_llama(llm, n_parallel=2, n_ctx=256) as m:
        r = pg.generate_parallel(m, ["The weights are shared"], max_tokens=8, temperature=0)
        assert r[0].completion_tokens > 0
        # the model file is mapped no more than before, and no anonymous copy appeared
        assert _file_rss(smollm2_path) <= max(file_rss, size) * 1.01
        assert rss_bytes() - rss0 < 0.5 * size + 64 * 2**20
        # same numerics as the Llama: greedy tokens of both agree
        ref = llm.create_completion("The weights are shared", max_tokens=8, temperature=0)
        assert r[0].text == ref["choices"][0]["text"]
    # a second full load of the same file, for contrast, maps the weights again
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=64) as other:
        pg.generate_parallel(other, ["x"], max_tokens=2)
        assert _file_rss(smollm2_path) > file_rss + 0.5 * size


def test_from_llama_rejects_non_llama():
    with pytest.raises(TypeError, match="llama_cpp.Llama"):
        pg.Model.from_llama("not a llama")


def test_llama_object_as_model_argument(smollm2_path):
    llm = pg.load_llama(str(smollm2_path), n_ctx=256, verbose=False)
    r = pg.generate_parallel(llm, ["Hello", "World"], max_tokens=3, temperature=0)
    assert len(r) == 2 and all(c.completion_tokens > 0 for c in r)
