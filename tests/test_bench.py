"""The benchmark CLI (parallel_gen.bench): tiny real runs, plus its pure parts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import parallel_gen as pg
from parallel_gen import bench, cli
from parallel_gen.bench import impls, report, workloads
from parallel_gen.bench.records import Measurement, Run

from conftest import import_extra


def _env() -> dict:
    """The child imports the same parallel_gen as this test."""
    env = dict(os.environ)
    root = str(Path(pg.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _bench(tmp_path: Path, model: Path, *extra: str) -> dict:
    out = tmp_path / "out.json"
    # One thread: on a loaded 2-core machine two spinning llama.cpp threads can stall.
    cmd = [sys.executable, "-m", "parallel_gen", "bench", "-m", str(model), "--repeat", "1", "--threads", "1",
           "--json", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    doc["_stdout"], doc["_stderr"] = p.stdout, p.stderr
    return doc


def _rows(doc: dict) -> dict:
    return {(r["workload"], r["variant"], r["impl"], r["n_parallel"]): r for r in doc["results"]}


def test_bench_tiny_run_writes_json(tmp_path, smollm2_path):
    doc = _bench(tmp_path, smollm2_path, "--prompts", "2", "--max-tokens", "4", "--n-parallel", "1,2,4",
                 "--workload", "short", "--no-batched-bench")
    assert "x loop" in doc["_stdout"] and "host ms/step" in doc["_stdout"]
    assert "note: n_parallel 4 skipped" in doc["_stderr"]
    assert doc["schema"] == bench.SCHEMA
    cfg = doc["config"]
    assert cfg["prompts"] == 2 and cfg["max_tokens"] == 4 and cfg["threads"] == 1
    assert cfg["n_parallel"] == [1, 2] and cfg["n_parallel_skipped"] == [4]
    assert cfg["batched_bench"] is None and cfg["flash_attn"] == "off" and cfg["workloads"] == ["short"]
    assert doc["workloads"]["short"]["variants"]["main"]["prompts"] == 2

    rows = _rows(doc)
    assert set(rows) == {("short", "main", "loop", None), ("short", "main", "parallel", 1),
                         ("short", "main", "parallel", 2)}
    loop = rows["short", "main", "loop", None]
    assert loop["x_loop"] == pytest.approx(1.0) and loop["x_bb"] is None
    for b in (1, 2):
        r = rows["short", "main", "parallel", b]
        m = r["median"]
        assert m["completion_tokens"] == 2 * 4 and m["incomplete"] == 0  # ignore_eos: every token
        assert m["wall_s"] > 0 and m["gen_tps"] > 0 and m["prompt_tps"] > 0 and m["peak_rss_mib"] > 0
        assert 0 < m["host_ms_step"] < 1000 * m["wall_s"] / m["decode_calls"]
        assert m["e2e_tps"] == pytest.approx(m["completion_tokens"] / m["wall_s"])
        assert r["x_loop"] == pytest.approx(m["e2e_tps"] / loop["median"]["e2e_tps"])  # one round
        assert r["x_bb"] is None and len(r["rounds"]) == 1 and r["errors"] == []
    assert loop["median"]["completion_tokens"] == 8 and loop["median"]["incomplete"] == 0


def test_bench_folded_workloads_ragged_grammar_concurrent(tmp_path, smollm2_path):
    # No --no-batched-bench: these workloads do not run llama-batched-bench, so they do
    # not look for it (the test machine has none).
    doc = _bench(tmp_path, smollm2_path, "--prompts", "4", "--max-tokens", "8", "--n-parallel", "4",
                 "--workload", "ragged,grammar,concurrent", "--callers", "2")
    assert doc["config"]["batched_bench"] is None
    rows = _rows(doc)
    assert set(rows) == {("ragged", "alternating", "parallel", 4), ("ragged", "contiguous", "parallel", 4),
                         ("grammar", "json_schema", "parallel", 4), ("grammar", "free", "parallel", 4),
                         ("concurrent", "main", "parallel", 4), ("concurrent", "main", "callers", 4)}
    assert not any(r["errors"] for r in rows.values())
    for var in ("alternating", "contiguous"):  # 2 prompts x 1 token + 2 x 8, in either order
        assert rows["ragged", var, "parallel", 4]["median"]["completion_tokens"] == 2 * 1 + 2 * 8
        assert rows["ragged", var, "parallel", 4]["median"]["incomplete"] == 0
    constrained = rows["grammar", "json_schema", "parallel", 4]["median"]
    assert 0 <= constrained["passed_check"] <= constrained["complete"] <= 4
    assert rows["grammar", "free", "parallel", 4]["median"]["passed_check"] is None
    assert rows["concurrent", "main", "callers", 4]["median"]["completion_tokens"] == 4 * 8
    names = {(c["workload"], c["name"]) for c in doc["comparisons"]}
    assert names == {("ragged", "ragged_wall_ratio"), ("grammar", "grammar_decode_ratio"),
                     ("grammar", "grammar_wall_ratio"), ("concurrent", "callers_ratio")}
    by_name = {c["name"]: c for c in doc["comparisons"]}
    ragged = rows["ragged", "alternating", "parallel", 4]["median"]["wall_s"] / \
        rows["ragged", "contiguous", "parallel", 4]["median"]["wall_s"]
    assert by_name["ragged_wall_ratio"]["median"] == pytest.approx(ragged)  # one round: the plain ratio
    assert "callers_ratio at B=4" in doc["_stdout"]


def _fake_batched_bench(where: Path) -> str:
    """A stand-in llama-batched-bench printing one jsonl row built from its arguments."""
    where.mkdir(parents=True, exist_ok=True)
    exe = where / "llama-batched-bench"
    exe.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        "a = sys.argv\n"
        "pp, tg, pl = (int(a[a.index(k) + 1]) for k in ('-npp', '-ntg', '-npl'))\n"
        "print('log line on stdout')\n"
        "print(json.dumps({'pp': pp, 'tg': tg, 'pl': pl, 't_pp': 0.5, 'speed_pp': pl * pp / 0.5,\n"
        "                  't_tg': 2.0, 'speed_tg': pl * tg / 2.0, 't': 2.5, 'speed': 1.0}))\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


def test_batched_bench_command_and_parsing(tmp_path):
    exe = _fake_batched_bench(tmp_path)
    cmd = impls.batched_bench_command(exe, "m.gguf", 20, 128, 16, 2, "off")
    assert cmd[cmd.index("-c") + 1] == str(16 * (20 + 128))
    assert cmd[cmd.index("-fa") + 1] == "off" and cmd[cmd.index("--output-format") + 1] == "jsonl"
    assert cmd[cmd.index("-ngl") + 1] == "0"
    gpu = impls.batched_bench_command(exe, "m.gguf", 20, 128, 16, 2, "on", n_gpu_layers=-1)
    assert gpu[gpu.index("-ngl") + 1] == "-1" and gpu[gpu.index("-fa") + 1] == "on"
    m = impls.run_batched_bench(cmd)
    assert isinstance(m, Measurement)
    assert m.gen_tps == pytest.approx(16 * 128 / 2.0) and m.completion_tokens == 16 * 128
    assert m.wall_s == pytest.approx(2.5) and m.peak_rss_mib > 0 and m.raw["pl"] == 16

    failing = tmp_path / "fails"
    failing.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeError, match="exited with 3"):
        impls.run_batched_bench([str(failing)])


@pytest.fixture
def no_batched_bench(tmp_path, monkeypatch):
    """Nothing on PATH, no environment variable, an empty source-tree benchmarks/bin."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.delenv(bench.BATCHED_BENCH_ENV, raising=False)
    monkeypatch.setattr(impls, "SOURCE_TREE_BIN", tmp_path / "tree-bin")


def test_find_batched_bench_flag_env_path_then_source_tree(tmp_path, monkeypatch, no_batched_bench):
    by_flag = _fake_batched_bench(tmp_path / "flag")
    by_env = _fake_batched_bench(tmp_path / "env")
    on_path = _fake_batched_bench(tmp_path / "path")
    in_tree = _fake_batched_bench(tmp_path / "tree-bin")
    assert bench.find_batched_bench() == in_tree  # a source checkout's benchmarks/bin, last
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert bench.find_batched_bench() == on_path
    # An installed wheel has no source tree: the environment variable names the binary.
    monkeypatch.setenv(bench.BATCHED_BENCH_ENV, by_env)
    assert bench.find_batched_bench() == by_env
    assert bench.find_batched_bench(by_flag) == by_flag  # the flag wins


def test_find_batched_bench_names_every_place_when_absent(tmp_path, monkeypatch, no_batched_bench):
    with pytest.raises(bench.BatchedBenchNotFound) as e:
        bench.find_batched_bench()
    msg = str(e.value)
    assert "--batched-bench PATH" in msg and bench.BATCHED_BENCH_ENV in msg and "on PATH" in msg
    assert str(tmp_path / "tree-bin") in msg and "--no-batched-bench" in msg
    # Named but missing: an error about that name, no fallback to another binary.
    _fake_batched_bench(tmp_path / "tree-bin")
    with pytest.raises(bench.BatchedBenchNotFound, match="--batched-bench /nonexistent/bb: no such executable"):
        bench.find_batched_bench("/nonexistent/bb")
    monkeypatch.setenv(bench.BATCHED_BENCH_ENV, str(tmp_path / "nope"))
    with pytest.raises(bench.BatchedBenchNotFound, match=f"{bench.BATCHED_BENCH_ENV} .*nope: no such executable"):
        bench.find_batched_bench()


def test_bench_without_batched_bench_fails_before_loading_anything(smollm2_path, capsys, no_batched_bench):
    args = ["-m", str(smollm2_path), "--prompts", "2", "--max-tokens", "2", "--n-parallel", "1"]
    assert bench.main(args) == 2
    err = capsys.readouterr().err
    assert "llama-batched-bench not found" in err and bench.BATCHED_BENCH_ENV in err
    assert cli.main(["bench", *args]) != 0  # the same through parallel-gen
    assert "llama-batched-bench not found" in capsys.readouterr().err


def _run(wl, var, rnd, impl, b, wall, gen_tps, prompt_s=None, prompts=16):
    m = Measurement(wall_s=wall, prompt_tokens=10, completion_tokens=100, e2e_tps=100.0 / wall, gen_tps=gen_tps,
                    prompt_s=prompt_s, peak_rss_mib=100.0)
    return Run(wl, var, impl, b, rnd, prompts, measurement=m)


def _count(text: str) -> int:
    return len(text.split())  # a stand-in tokenizer


def test_aggregate_ratios_are_medians_of_per_round_ratios():
    prefix = workloads.build_workload("prefix", 4, _count, 8, prefix_tokens=20)
    runs = []
    for rnd, slow in enumerate((1.0, 2.0, 1.0)):  # round 1 ran on a twice slower machine
        runs += [
            _run("prefix", "shared", rnd, "loop", None, 10.0 * slow, 10.0 / slow),
            _run("prefix", "shared", rnd, "parallel", 16, 4.0 * slow, 30.0 / slow, prompt_s=1.0 * slow),
            _run("prefix", "noreuse", rnd, "parallel", 16, 8.0 * slow, 30.0 / slow, prompt_s=6.0 * slow),
            _run("prefix", "shared", rnd, "batched-bench", 16, 3.0 * slow, 40.0 / slow),
            _run("prefix", "shared", rnd, "batched-bench", 1, 3.0 * slow, 12.0 / slow),
        ]
    runs.append(Run("prefix", "shared", "batched-bench", 32, 2, 16, error="boom"))
    rep = report.aggregate(runs, [prefix])
    rows = {(r.variant, r.impl, r.n_parallel): r for r in rep.rows}
    assert [(r.variant, r.impl) for r in rep.rows][:2] == [("shared", "loop"), ("shared", "parallel")]
    par = rows["shared", "parallel", 16]
    assert par.x_loop == pytest.approx(2.5) and par.x_bb == pytest.approx(0.75)
    assert par.median["wall_s"] == pytest.approx(4.0)
    assert rows["shared", "loop", None].x_bb == pytest.approx(10.0 / 12.0)
    (cmp,) = rep.comparisons
    assert (cmp.name, cmp.n_parallel) == ("prefix_prompt_speedup", 16)
    assert cmp.values == pytest.approx([6.0, 6.0, 6.0]) and cmp.median == pytest.approx(6.0)
    assert rows["shared", "batched-bench", 32].errors == ["boom"]
    assert rows["shared", "batched-bench", 32].median["wall_s"] is None
    assert rep.targets == []  # 16 prompts: no target applies to the prefix workload
    table = report.format_table(rep.rows)
    assert "x bb" in table and "2.50" in table and " !" in table
    summary = report.format_summary(rep)
    assert "prefix_prompt_speedup at B=16: 6.00" in summary and "error in prefix/shared/batched-bench/B=32" in summary
    json.dumps(report.document({"model": "m"}, [prefix], rep, table))  # serialisable as it is


def test_aggregate_medians_use_every_round():
    short = workloads.build_workload("short", 32, _count, 8)
    walls = (1.0, 5.0, 2.0, 100.0)  # an outlier round: the median ignores it
    runs = [_run("short", "main", rnd, "parallel", 32, w, 10.0, prompts=32) for rnd, w in enumerate(walls)]
    runs += [_run("short", "main", rnd, "loop", None, 4.0, 5.0, prompts=32) for rnd in range(4)]
    rep = report.aggregate(runs, [short])
    row = next(r for r in rep.rows if r.impl == "parallel")
    assert row.median["wall_s"] == pytest.approx(3.5) and row.rounds_ok == 4
    assert row.x_loop == pytest.approx(report.median([4.0 / w for w in walls]))
    (target,) = rep.targets
    assert target.name == "e2e_vs_loop_32_prompts" and target.target == report.TARGET_E2E_VS_LOOP_32
    assert report.median([None, None]) is None and report.median([3, None, 1]) == 2.0


def test_workloads_are_deterministic_and_shaped():
    a = workloads.build_workload("prefix", 4, _count, 8, prefix_tokens=50)
    b = workloads.build_workload("prefix", 4, _count, 8, prefix_tokens=50)
    shared, control = a.variants
    assert shared.prompts == b.variants[0].prompts and len(set(shared.prompts)) == 4
    assert os.path.commonprefix(shared.prompts).count(" ") >= 49  # the shared prefix
    assert os.path.commonprefix(control.prompts) == "Question "  # the control shares nothing
    assert shared.n_ctx == control.n_ctx and shared.n_ctx % 64 == 0
    assert shared.n_ctx >= a.max_prompt_tokens + 8
    mixed = workloads.build_workload("mixed", 4, _count, 8).variants[0]
    assert len(set(mixed.prompt_tokens)) == 4
    assert len(workloads.build_workload("short", 20, _count, 8).variants[0].prompts) == 20

    alternating, contiguous = workloads.build_workload("ragged", 6, _count, 16).variants
    assert alternating.max_tokens == [2, 16, 2, 16, 2, 16] and contiguous.max_tokens == [2, 2, 2, 16, 16, 16]
    assert alternating.prompts == contiguous.prompts
    constrained, free = workloads.build_workload("grammar", 3, _count, 16).variants
    assert "json_schema" in constrained.sampling and "json_schema" not in free.sampling
    assert constrained.check('{"a": 1}') and not constrained.check('{"a": ')
    assert not constrained.full_length and free.check is None
    assert workloads.build_workload("concurrent", 3, _count, 4).variants[0].impls == ("parallel", "callers")
    for name in workloads.WORKLOADS:  # the bench looks for llama-batched-bench only for these
        uses = any("batched-bench" in v.impls for v in workloads.build_workload(name, 2, _count, 4).variants)
        assert uses == (name in workloads.AGAINST_LLAMA_CPP), name
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        workloads.build_workload("nope", 1, _count, 4)


def test_workload_option_parsing(capsys):
    parse = lambda *a: cli.build_parser().parse_args(["bench", *a])  # noqa: E731
    assert parse().workload == ["short", "prefix", "mixed"]
    assert parse("--workload", "all").workload == list(workloads.WORKLOADS)
    assert parse("--workload", "grammar,short,grammar").workload == ["grammar", "short"]
    with pytest.raises(SystemExit):
        parse("--workload", "short,bogus")
    assert "unknown workload(s) bogus" in capsys.readouterr().err


def test_plot_needs_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        report.check_matplotlib()


def test_plot_writes_png(tmp_path):
    import_extra("matplotlib", "plot")
    short = workloads.build_workload("short", 4, _count, 8)
    runs = [_run("short", "main", 0, "loop", None, 10.0, 10.0)]
    runs += [_run("short", "main", 0, "parallel", b, 10.0 / b, 10.0 * b) for b in (1, 2, 4)]
    runs += [_run("short", "main", 0, "batched-bench", b, 9.0 / b, 11.0 * b) for b in (1, 2, 4)]
    rep = report.aggregate(runs, [short])
    out = tmp_path / "plot.png"
    report.write_plot(str(out), rep.rows, {"model": "m.gguf", "threads": 2, "flash_attn": "off", "repeat": 1,
                                           "prompts": 16, "max_tokens": 128})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
