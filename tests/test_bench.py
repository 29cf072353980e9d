"""The benchmark CLI (parallel_gen.bench): one tiny real run, plus its pure parts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import parallel_gen as pg
from parallel_gen import bench


def _env() -> dict:
    """The child imports the same parallel_gen as this test."""
    env = dict(os.environ)
    root = str(Path(pg.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_bench_tiny_run_writes_json(tmp_path, smollm2_path):
    out = tmp_path / "out.json"
    # One thread: on a loaded 2-core machine two spinning llama.cpp threads can stall.
    cmd = [sys.executable, "-m", "parallel_gen", "bench", "-m", str(smollm2_path), "--prompts", "2",
           "--max-tokens", "4", "--n-parallel", "1,2,4", "--workload", "short", "--repeat", "1",
           "--threads", "1", "--no-batched-bench", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "x loop" in p.stdout and "note: n_parallel 4 skipped" in p.stderr

    doc = json.loads(out.read_text())
    assert doc["schema"] == bench.SCHEMA
    cfg = doc["config"]
    assert cfg["prompts"] == 2 and cfg["max_tokens"] == 4 and cfg["threads"] == 1
    assert cfg["n_parallel"] == [1, 2] and cfg["n_parallel_skipped"] == [4]
    assert cfg["batched_bench"] is None and cfg["flash_attn"] == "off"
    assert doc["workloads"]["short"]["prompts"] == 2

    rows = {(r["workload"], r["impl"], r["n_parallel"]): r for r in doc["results"]}
    assert set(rows) == {("short", "loop", None), ("short", "parallel", 1), ("short", "parallel", 2)}
    loop = rows["short", "loop", None]
    assert loop["x_loop"] == pytest.approx(1.0) and loop["x_bb"] is None
    for b in (1, 2):
        r = rows["short", "parallel", b]
        m = r["median"]
        assert m["completion_tokens"] == 2 * 4 and m["incomplete"] == 0  # ignore_eos: every token
        assert m["wall_s"] > 0 and m["gen_tps"] > 0 and m["prompt_tps"] > 0 and m["peak_rss_mib"] > 0
        assert m["e2e_tps"] == pytest.approx(m["completion_tokens"] / m["wall_s"])
        assert r["x_loop"] == pytest.approx(m["e2e_tps"] / loop["median"]["e2e_tps"])  # one round
        assert r["x_bb"] is None and len(r["rounds"]) == 1
    assert loop["median"]["completion_tokens"] == 8 and loop["median"]["incomplete"] == 0


def _fake_batched_bench(tmp_path: Path) -> str:
    """A stand-in llama-batched-bench printing one jsonl row built from its arguments."""
    exe = tmp_path / "llama-batched-bench"
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
    cmd = bench.batched_bench_command(exe, "m.gguf", 20, 128, 16, 2, "off")
    assert cmd[cmd.index("-c") + 1] == str(16 * (20 + 128))
    assert cmd[cmd.index("-fa") + 1] == "off" and cmd[cmd.index("--output-format") + 1] == "jsonl"
    assert cmd[cmd.index("-ngl") + 1] == "0"
    gpu = bench.batched_bench_command(exe, "m.gguf", 20, 128, 16, 2, "on", n_gpu_layers=-1)
    assert gpu[gpu.index("-ngl") + 1] == "-1" and gpu[gpu.index("-fa") + 1] == "on"
    r = bench.run_batched_bench(cmd)
    assert r["gen_tps"] == pytest.approx(16 * 128 / 2.0) and r["completion_tokens"] == 16 * 128
    assert r["wall_s"] == pytest.approx(2.5) and r["peak_rss_mib"] > 0
    assert bench.find_batched_bench(exe) == exe

    failing = tmp_path / "fails"
    failing.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeError, match="exited with 3"):
        bench.run_batched_bench([str(failing)])


def _run(wl, rnd, impl, b, wall, gen_tps, prompt_s=None, **extra):
    r = {"workload": wl, "round": rnd, "impl": impl, "n_parallel": b, "prompts": 16, "wall_s": wall,
         "gen_tps": gen_tps, "prompt_tps": None, "e2e_tps": 100.0 / wall, "prompt_s": prompt_s, "gen_s": None,
         "peak_rss_mib": 100.0, "prompt_tokens": 10, "completion_tokens": 100, "incomplete": 0}
    r.update(extra)
    return r


def test_aggregate_ratios_are_medians_of_per_round_ratios():
    runs = []
    for rnd, slow in enumerate((1.0, 2.0, 1.0)):  # round 1 ran on a twice slower machine
        runs += [
            _run("prefix", rnd, "loop", None, 10.0 * slow, 10.0 / slow),
            _run("prefix", rnd, "parallel", 16, 4.0 * slow, 30.0 / slow, prompt_s=1.0 * slow),
            _run("prefix", rnd, "parallel-noreuse", 16, 8.0 * slow, 30.0 / slow, prompt_s=6.0 * slow),
            _run("prefix", rnd, "batched-bench", 16, 3.0 * slow, 40.0 / slow),
            _run("prefix", rnd, "batched-bench", 1, 3.0 * slow, 12.0 / slow),
        ]
    runs.append({"workload": "prefix", "round": 2, "impl": "batched-bench", "n_parallel": 32, "prompts": 16,
                 "error": "boom"})
    results, summary = bench.aggregate(runs)
    rows = {(r["impl"], r["n_parallel"]): r for r in results}
    assert [r["impl"] for r in results][:2] == ["loop", "parallel"]
    par = rows["parallel", 16]
    assert par["x_loop"] == pytest.approx(2.5) and par["x_bb"] == pytest.approx(0.75)
    assert par["median"]["wall_s"] == pytest.approx(4.0)
    assert rows["loop", None]["x_bb"] == pytest.approx(10.0 / 12.0)
    assert rows["parallel-noreuse", 16]["prefix_prompt_speedup"] == pytest.approx(6.0)
    assert summary["workloads"]["prefix"]["prefix_prompt_speedup"] == {"16": pytest.approx(6.0)}
    assert rows["batched-bench", 32]["errors"] == ["boom"] and rows["batched-bench", 32]["median"]["wall_s"] is None
    table = bench.format_table(results)
    assert "x bb" in table and "2.50" in table
    assert "6.00x faster" in bench.format_summary(results, summary)


def test_workloads_are_deterministic_and_shaped():
    count = lambda text: len(text.split())  # noqa: E731  (a stand-in tokenizer)
    a = bench.build_workload("prefix", 4, count, prefix_tokens=50)
    b = bench.build_workload("prefix", 4, count, prefix_tokens=50)
    assert a.prompts == b.prompts and len(set(a.prompts)) == 4
    assert os.path.commonprefix(a.prompts).count(" ") >= 49  # the shared prefix
    assert os.path.commonprefix(a.noreuse_prompts) == "Question "  # the control shares nothing
    mixed = bench.build_workload("mixed", 4, count)
    assert len(set(mixed.prompt_tokens)) == 4
    assert len(bench.build_workload("short", 20, count).prompts) == 20


def test_plot_needs_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        bench.check_matplotlib()


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_run("short", 0, "loop", None, 10.0, 10.0)]
    runs += [_run("short", 0, "parallel", b, 10.0 / b, 10.0 * b) for b in (1, 2, 4)]
    runs += [_run("short", 0, "batched-bench", b, 9.0 / b, 11.0 * b) for b in (1, 2, 4)]
    results, _ = bench.aggregate(runs)
    out = tmp_path / "plot.png"
    bench.write_plot(str(out), results, {"model": "m.gguf", "threads": 2, "flash_attn": "off", "repeat": 1,
                                         "prompts": 16, "max_tokens": 128})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
