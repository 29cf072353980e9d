"""Weight repacking (llama.cpp's extra buffer types) and the AMX policy.

llama.cpp's AMX kernels crash on recent Intel Xeons; parallel_gen loads weights without
extra buffer types on a build that has them. This machine may have no AMX: the policy
is tested with the capability simulated (a CpuBuild saying AMX_INT8 = 1), and the path
an AMX machine takes (repack=False) is run for real here, on real models, through every
entry point: generate, chat, stream, classify, a file job and the server.
"""

from __future__ import annotations

import json
import logging
import pickle

import llama_cpp
import pytest

import parallel_gen as pg
from parallel_gen import cli
from parallel_gen.cli import options
from parallel_gen import repack as rp
from parallel_gen._native import _core
from parallel_gen.repack import CpuBuild, check_borrowed, choose_repack, cpu_build

from test_classify_cli import classify_cli
from test_jobs import cli as generate_cli
from test_jobs import read_jsonl, write_jsonl
from test_server import Server

AMX = CpuBuild(features={"AVX2": "1", "AVX512": "1", "AMX_INT8": "1", "REPACK": "1"},
               extra_buffer_types=("AMX", "CPU_REPACK"), amx_kernels=True)
NO_AMX = CpuBuild(features={"AVX2": "1", "REPACK": "1"}, extra_buffer_types=("CPU_REPACK",), amx_kernels=False)
# What crashed an AMX build in the issue: several prompts of 64+ tokens in one batch.
LONG = [f"Write a detailed essay about topic number {i}, covering its history, its science and its "
        f"culture, with three examples from different centuries, one from each continent you know well, "
        f"and a short conclusion that sums up what the reader should remember about topic number {i}, "
        f"why it matters today, and which questions about it remain open for the next generation:"
        for i in range(4)]


def extra_buffers_in_log(text):
    """The extra buffer types llama.cpp's load log says it put weights in."""
    return {b for b in cpu_build().extra_buffer_types if f"{b} model buffer size" in text}


# -- the policy, the AMX capability simulated -------------------------------------------------
def test_auto_turns_repacking_off_only_on_a_build_with_amx_kernels():
    amx, plain = choose_repack(None, AMX), choose_repack(None, NO_AMX)
    assert amx.use_extra_bufts is False and "AMX" in amx.reason and "repack=True" in amx.reason
    assert plain.use_extra_bufts is True
    for build in (AMX, NO_AMX):
        for given in (True, False):
            assert choose_repack(given, build).use_extra_bufts is given


def test_from_llama_check_refuses_repacked_weights_on_an_amx_build_only():
    with pytest.raises(ValueError, match=r"load_llama\(path, \.\.\.\)") as e:
        check_borrowed(True, None, AMX)
    assert "AMX" in str(e.value) and "repack=True" in str(e.value)
    check_borrowed(False, None, AMX)  # loaded safely
    check_borrowed(True, True, AMX)  # opted in: a fixed llama.cpp
    check_borrowed(True, None, NO_AMX)
    check_borrowed(False, None, NO_AMX)
    # a repack given must be how the Llama was loaded (its weights are already placed)
    with pytest.raises(ValueError, match=r"repack=False.*loaded with extra"):
        check_borrowed(True, False, NO_AMX)
    with pytest.raises(ValueError, match=r"repack=True.*loaded without extra"):
        check_borrowed(False, True, AMX)


def test_on_a_simulated_amx_build_every_loader_keeps_extra_buffer_types_off(smollm2_path, monkeypatch, caplog,
                                                                           capfd):
    monkeypatch.setattr(rp, "cpu_build", lambda: AMX)
    rp._log_once.cache_clear()
    caplog.set_level(logging.INFO, logger="parallel_gen")
    for _ in range(2):
        with pg.Model(smollm2_path, n_parallel=4, n_ctx=256, verbose=True) as m:
            assert m.repack is False and m.numerics()["repack"] is False
    assert extra_buffers_in_log(capfd.readouterr().err) == set()
    said = [r.getMessage() for r in caplog.records if "AMX" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("weight repacking off: ")  # why, once per process

    plain = llama_cpp.Llama(str(smollm2_path), n_ctx=256, verbose=False)
    try:
        assert plain.model_params.use_extra_bufts is True  # llama-cpp-python's default
        with pytest.raises(ValueError, match="load_llama"):
            pg.Model.from_llama(plain, n_parallel=2)
        with pytest.raises(ValueError, match="load_llama"):  # a Llama as generate's model argument
            pg.generate_parallel(plain, ["Hi"], max_tokens=2)
        with pg.Model.from_llama(plain, n_parallel=2, repack=True) as m:  # the opt-in
            assert m.repack is True
    finally:
        plain.close()
    safe = pg.load_llama(str(smollm2_path), n_ctx=256, verbose=False)
    try:
        assert isinstance(safe, llama_cpp.Llama) and safe.model_params.use_extra_bufts is False
        with pg.Model.from_llama(safe, n_parallel=4) as m:
            assert m.repack is False
            r = pg.generate_parallel(m, LONG, max_tokens=4, temperature=0, ignore_eos=True)
            assert [c.finish_reason for c in r] == ["length"] * 4
    finally:
        safe.close()


@pytest.mark.parametrize("bad", ["yes", 1, 0, "auto"])
def test_repack_must_be_true_false_or_none(smollm2_path, bad):
    with pytest.raises(TypeError, match="repack"):
        pg.Model(smollm2_path, n_parallel=1, n_ctx=64, repack=bad)
    with pytest.raises(TypeError, match="repack"):
        pg.load_llama(str(smollm2_path), repack=bad, verbose=False)


# -- this process's build ---------------------------------------------------------------------
def test_cpu_build_is_what_llama_cpp_reports():
    b = cpu_build()
    info = _core.system_info()
    assert b.features and all(f"{k} = {v}" in info for k, v in b.features.items())
    assert b.amx_kernels == (b.features.get("AMX_INT8") == "1")
    assert ("CPU_REPACK" in b.extra_buffer_types) == (b.features.get("REPACK") == "1")
    assert "AMX" not in b.extra_buffer_types or b.amx_kernels
    assert choose_repack(None, b).use_extra_bufts is not b.amx_kernels


# -- repack=False really keeps the weights out of the extra buffer types ----------------------
def test_repack_false_loads_no_weight_into_an_extra_buffer_type(gemma3_path, capfd):
    """Gemma's Q4_K/Q6_K weights are repacked on AVX2 (CPU_REPACK) and AMX builds alike;
    loading only (no decode), so repack=True is safe on an AMX machine too."""
    assert cpu_build().extra_buffer_types, "this llama.cpp build has no extra buffer types to turn off"
    capfd.readouterr()
    seen = {}
    for repack in (True, False):
        with pg.Model(gemma3_path, n_parallel=1, n_ctx=64, repack=repack, verbose=True) as m:
            assert m.repack is repack and m.numerics()["repack"] is repack
        err = capfd.readouterr().err
        assert "CPU_Mapped model buffer size" in err  # the load log was captured
        seen[repack] = extra_buffers_in_log(err)
    assert seen[True] and seen[False] == set()

    # load_llama: the same through llama-cpp-python's own loading
    for repack in (True, False):
        llm = pg.load_llama(str(gemma3_path), repack=repack, n_ctx=64, verbose=True)
        try:
            assert llm.model_params.use_extra_bufts is repack
            if not repack:
                again = pickle.loads(pickle.dumps(llm))  # how Ray ships a Llama: the choice survives
                assert type(again) is type(llm) and again.model_params.use_extra_bufts is False
                again.close()
        finally:
            llm.close()
        err = capfd.readouterr().err
        assert "CPU_Mapped model buffer size" in err
        seen[repack] = extra_buffers_in_log(err)
    assert seen[True] and seen[False] == set()


# -- the workload that crashed an AMX build, with this build's default ------------------------
@pytest.mark.parametrize("which", ["smollm2_path", "gemma3_path"])
def test_default_settings_run_four_long_prompts_at_n_parallel_4(request, which):
    path = request.getfixturevalue(which)
    with pg.Model(path, n_parallel=4, n_ctx=256) as m:
        assert m.repack is choose_repack(None, cpu_build()).use_extra_bufts
        assert all(len(m.tokenize(p)) >= 64 for p in LONG)
        r = pg.generate_parallel(m, LONG, max_tokens=8, temperature=0, ignore_eos=True)
        assert [c.finish_reason for c in r] == ["length"] * 4 and all(c.completion_tokens == 8 for c in r)
    llm = pg.load_llama(str(path), n_ctx=256, verbose=False)  # plain llama-cpp-python crashed too
    try:
        out = llm.create_completion(LONG[0], max_tokens=4, temperature=0)
        assert out["usage"]["prompt_tokens"] >= 64 and out["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()


# -- the AMX path (repack=False) through every entry point, on real models ---------------------
@pytest.fixture(scope="module", params=["smollm2_path", "gemma3_path"])
def no_repack(request):
    path = request.getfixturevalue(request.param)
    # prompt_cache off: the tests compare greedy outputs across calls, and a prefill resumed
    # from a cached prefix changes Gemma's numerics slightly
    with pg.Model(path, n_parallel=4, n_ctx=256, flash_attn=False, repack=False, prompt_cache=False) as m:
        yield m


def test_no_repack_generates_what_llama_cpp_python_loaded_so_does(no_repack):
    r = pg.generate_parallel(no_repack, LONG, max_tokens=12, temperature=0, ignore_eos=True)
    assert [c.finish_reason for c in r] == ["length"] * 4
    llm = pg.load_llama(no_repack.path, repack=False, n_ctx=256, flash_attn=False, verbose=False)
    try:
        for c in r[:2]:
            ref = llm.create_completion(c.prompt, max_tokens=12, temperature=0, logit_bias=None)
            assert ref["choices"][0]["text"] == c.text
    finally:
        llm.close()


def test_no_repack_chat_stream_and_classify(no_repack):
    template = None if no_repack.chat_template() else "gemma"  # Gemma 3 270M is a base model
    convs = [[{"role": "user", "content": p}] for p in LONG]
    chats = pg.chat_parallel(no_repack, convs, max_tokens=8, temperature=0, chat_template=template)
    assert all(c.error is None and c.completion_tokens >= 1 for c in chats)

    texts = {i: "" for i in range(4)}
    for ev in pg.stream_parallel(no_repack, LONG, max_tokens=8, temperature=0, ignore_eos=True):
        texts[ev.index] += ev.text
    assert list(texts.values()) == pg.generate_parallel(no_repack, LONG, max_tokens=8, temperature=0,
                                                        ignore_eos=True).texts

    res = pg.classify(no_repack, LONG, ["history", "science", "culture"])
    assert res.probs.shape == (4, 3) and all(c.error is None for c in res)
    assert abs(res.probs.sum(axis=1) - 1).max() < 1e-9


def test_no_repack_file_job_and_classify_command(gemma3_path, smollm2_path, tmp_path):
    """--no-repack reaches the Model of a file job (Gemma's weights would be repacked here)."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in LONG])
    r = generate_cli("--file", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "-m", gemma3_path, "--no-repack",
            "-n", 6, "--temperature", 0, "--ignore-eos", "--n-parallel", 4, "--n-ctx", 256, "--flash-attn", "off",
            "--threads", 1, "-v")
    assert r.returncode == 0, r.stderr
    assert "CPU_Mapped model buffer size" in r.stderr and extra_buffers_in_log(r.stderr) == set()
    rows = read_jsonl(tmp_path / "out.jsonl")
    with pg.Model(gemma3_path, n_parallel=4, n_ctx=256, flash_attn=False, n_threads=1, repack=False) as m:
        want = pg.generate_parallel(m, LONG, max_tokens=6, temperature=0, ignore_eos=True).texts
    assert [row["text"] for row in rows] == want and all(row["error"] is None for row in rows)

    c = classify_cli(*LONG[:2], "--labels", "a,b", "-m", smollm2_path, "--no-repack", "--threads", 1)
    assert c.returncode == 0, c.stderr
    assert [json.loads(line)["error"] for line in c.stdout.splitlines()] == [None, None]


def test_no_repack_server(gemma3_path):
    server = Server(gemma3_path, "--no-repack", "--n-parallel", "4", "-v")
    try:
        r = server.client().completions.create(model="smol", prompt=LONG, max_tokens=6, temperature=0)
        assert sorted(c.finish_reason for c in r.choices) == ["length"] * 4
        got = {c.index: c.text for c in r.choices}
    finally:
        server.stop()
    log = "".join(server.lines)
    assert "CPU_Mapped model buffer size" in log and extra_buffers_in_log(log) == set()
    with pg.Model(gemma3_path, n_parallel=4, n_ctx=512, n_threads=2, repack=False) as m:
        want = pg.generate_parallel(m, LONG, max_tokens=6, temperature=0).texts
    assert [got[i] for i in range(4)] == want


# -- the option on every command that opens a model --------------------------------------------
@pytest.mark.parametrize("command", [["generate", "x"], ["classify", "x", "--labels", "a,b"], ["serve"], ["bench"]])
def test_repack_flags_on_every_model_command(command):
    parse = cli.build_parser().parse_args
    assert parse(command).repack is None
    assert parse([*command, "--repack"]).repack is True
    assert parse([*command, "--no-repack"]).repack is False
    if command[0] != "bench":  # bench resolves it once for the Llama and every Model
        assert "repack" not in options.model_options(parse(command), 1)
        assert options.model_options(parse([*command, "--no-repack"]), 1)["repack"] is False


def test_batched_bench_gets_the_same_repacking():
    from parallel_gen.bench import impls

    assert "--no-repack" in impls.batched_bench_command("bb", "m.gguf", 8, 8, 2, 1, "off", repack=False)
    assert "--repack" in impls.batched_bench_command("bb", "m.gguf", 8, 8, 2, 1, "off", repack=True)
