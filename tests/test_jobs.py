"""Batch jobs (parallel_gen.jobs and `parallel-gen generate`): streamed, ordered, resumable.

Real runs on SmolLM2 with short prompts and 2-4 greedy tokens; outputs are compared with
generate_parallel on the same prompts (greedy SmolLM2 output does not depend on the batch).
"""

from __future__ import annotations

import concurrent.futures
import csv
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import parallel_gen as pg
from parallel_gen.jobs import JobInputError, generate_iter, run_file_job
from parallel_gen.jobs.sinks import JOURNAL_SUFFIX
from conftest import terminal_sigint

PYTHON_DIR = str(Path(pg.__file__).resolve().parent.parent)
# One thread, small contexts: the same numerics in the test process and in CLI subprocesses.
MODEL = dict(n_parallel=8, n_ctx=256, n_threads=1)
CLI_MODEL = ["--n-parallel", 8, "--n-ctx", 256, "--threads", 1]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with pg.Model(smollm2_path, **MODEL) as m:
        yield m


def cli(*args, stdin=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    return subprocess.run([sys.executable, "-m", "parallel_gen", "generate", *map(str, args)], input=stdin or "",
                          capture_output=True, text=True, env=env, timeout=timeout)


def start_cli(*args):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    return subprocess.Popen([sys.executable, "-m", "parallel_gen", "generate", *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=terminal_sigint)  # it may be sent Ctrl-C


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def greedy(model, prompts, n):
    return pg.generate_parallel(model, prompts, max_tokens=n, temperature=0).texts


def complete_lines(path):
    """Lines of a file being written: the last one only when it is complete."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    return data.count(b"\n")


def wait_for_lines(path, n, proc, timeout=600):
    t0 = time.time()
    while complete_lines(path) < n:
        assert proc.poll() is None, f"the job ended before {n} rows: {proc.communicate()}"
        assert time.time() - t0 < timeout, "no progress"
        time.sleep(0.05)


# -- generate_iter ------------------------------------------------------------------------
def test_generate_iter_is_lazy_ordered_and_matches_generate_parallel(smol):
    prompts = [f"Item {i}: the sky is" for i in range(30)]
    pulled = []

    def source():
        for p in prompts:
            pulled.append(p)
            yield p

    lookahead = 6
    got = []
    for c in generate_iter(smol, source(), lookahead=lookahead, max_tokens=3, temperature=0):
        got.append(c)
        # Never more than the look-ahead read and not yet handed back.
        assert len(pulled) - len(got) <= lookahead
    assert [c.index for c in got] == list(range(30))
    assert [c.prompt for c in got] == prompts
    assert [c.text for c in got] == greedy(smol, prompts, 3)


def test_generate_iter_bad_prompts_become_error_completions(smol):
    prompts = ["Water boils at", 42, "", "x " * 400, "Roses are red,"]
    got = list(generate_iter(smol, iter(prompts), max_tokens=2, temperature=0))
    assert [c.finish_reason == "error" for c in got] == [False, True, True, True, False]
    assert "must be a str" in got[1].error and "n_ctx=256" in got[3].error
    assert [got[0].text, got[4].text] == greedy(smol, ["Water boils at", "Roses are red,"], 2)
    # Per-prompt params: one that is not a SamplingParams fails its prompt alone.
    params = [pg.SamplingParams(max_tokens=1, temperature=0), "hot", pg.SamplingParams(max_tokens=2, temperature=0)]
    got = list(generate_iter(smol, ["a b c", "d e f", "g h i"], iter(params)))
    assert [len(c.token_ids) for c in got] == [1, 0, 2] and "params[1]" in got[1].error


def test_generate_iter_of_a_million_prompts_reads_only_what_it_needs_and_cancels_on_close(smol):
    pulled = itertools.count()
    endless = (f"Prompt number {next(pulled)}:" for _ in range(10**6))
    # The first 3 finish at once; the others would run 500 tokens each.
    params = (pg.SamplingParams(max_tokens=2 if i < 3 else 500, temperature=0, ignore_eos=True)
              for i in itertools.count())
    it = generate_iter(smol, endless, params, lookahead=16)
    first = [next(it) for _ in range(3)]
    assert [c.index for c in first] == [0, 1, 2]
    assert next(pulled) <= 3 + 16 + 1  # the counter's next value: how many were read
    assert smol.stats().slots_busy > 0
    t0 = time.time()
    it.close()  # cancels what is in flight
    assert time.time() - t0 < 10
    s = smol.stats()
    assert (s.active_requests, s.queued_prompts, s.slots_busy) == (0, 0, 0)
    assert greedy(smol, ["Still usable:"], 2)  # the Model goes on


def test_generate_iter_rejects_bad_arguments(smol):
    with pytest.raises(TypeError, match="iterable of str"):
        generate_iter(smol, "one prompt")
    with pytest.raises(TypeError, match="temprature"):
        generate_iter(smol, ["a"], temprature=0)
    with pytest.raises(ValueError, match="lookahead"):
        generate_iter(smol, ["a"], lookahead=0)
    with pytest.raises(TypeError, match="set"):
        generate_iter(smol, {"a", "b"})


# -- the resumable file job ---------------------------------------------------------------
def test_jsonl_job_sigkilled_three_times_and_resumed_equals_an_uninterrupted_run(smol, tmp_path):
    n = 2000
    rows = [{"id": f"id-{i}", "prompt": f"Item {i}", "group": i % 3} for i in range(n)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, rows)
    # The uninterrupted run, in this process while the job runs in another (two cores).
    reference = concurrent.futures.ThreadPoolExecutor(1).submit(greedy, smol, [r["prompt"] for r in rows], 2)
    args = ["-f", src, "-o", out, "-n", 2, "--temperature", 0, *CLI_MODEL]
    rng = random.Random(12)
    for kill in range(3):
        proc = start_cli(*args, "--resume")
        wait_for_lines(out, complete_lines(out) + 1 + rng.randrange(200), proc)
        time.sleep(rng.random() * 0.3)  # a random moment, often mid-write
        proc.kill()
        proc.wait()
    r = cli(*args, "--resume", "--stats", timeout=1200)  # generous: a busy CI machine
    assert r.returncode == 0, r.stderr
    got = read_jsonl(out)
    assert [g["row"] for g in got] == list(range(n))  # every row once, in order
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert [g["group"] for g in got] == [r["group"] for r in rows]
    assert all(g["error"] is None and g["completion_tokens"] == 2 for g in got)
    assert [g["text"] for g in got] == reference.result()
    assert "already done" in r.stderr


def test_output_rows_appear_while_the_job_runs_and_ctrl_c_keeps_them(smol, tmp_path):
    prompts = [f"Line {i} says" for i in range(200)]
    src, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    src.write_text("\n".join(prompts) + "\n")
    reference = concurrent.futures.ThreadPoolExecutor(1).submit(greedy, smol, prompts, 3)
    proc = start_cli("-f", src, "-o", out, "-n", 3, "--temperature", 0, *CLI_MODEL)
    wait_for_lines(out, 10, proc)  # rows are on disk while the job is still running
    assert proc.poll() is None
    before = complete_lines(out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)  # a hang guard: a loaded machine makes seconds meaningless
    assert proc.returncode == 130, err
    assert "--resume" in err and str(out) in err and "Traceback" not in err
    kept = read_jsonl(out)  # every line complete
    assert 10 <= len(kept) < 200 and [k["row"] for k in kept] == list(range(len(kept)))
    # It stopped at once, in rows rather than seconds: no more than the look-ahead (4 per
    # slot, the rows already in flight) was written after Ctrl-C.
    assert len(kept) - before <= 4 * 8
    r = cli("-f", src, "-o", out, "-n", 3, "--temperature", 0, *CLI_MODEL, "--resume")
    assert r.returncode == 0, r.stderr
    got = read_jsonl(out)
    assert [g["prompt"] for g in got] == prompts
    assert [g["text"] for g in got] == reference.result()


def test_existing_output_is_protected(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    r = cli("Hello", "-o", out, "-n", 1, *CLI_MODEL)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(out) in r.stderr and "--overwrite" in r.stderr and "--resume" in r.stderr
    assert out.read_text() == "precious\n"
    # --resume refuses a file no job wrote, and leaves it alone too.
    r = cli("Hello", "-o", out, "-n", 1, "--resume", *CLI_MODEL)
    assert r.returncode == 2 and "cannot be resumed" in r.stderr and out.read_text() == "precious\n"
    r = cli("Hello", "-o", out, "-n", 1, "--temperature", 0, "--overwrite", *CLI_MODEL)
    assert r.returncode == 0, r.stderr
    assert [g["prompt"] for g in read_jsonl(out)] == ["Hello"]
    r = cli("Hello", "-o", out, "--resume", "--overwrite")
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_malformed_line_mid_file_is_an_error_row_and_the_job_goes_on(smol, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b'{"id": 1, "prompt": "Water boils at"}\n'
                    b'{"id": 2, "prompt": \n'
                    b'\n'
                    b'{"id": 3}\n'
                    b'{"id": 4, "prompt": "caf\xe9"}\n'
                    b'{"id": 5, "prompt": "Roses are red,", "max_tokens": 1}\n'
                    b'{"id": 6, "prompt": "Roses are red,", "temperature": "hot"}\n')
    r = cli("-f", src, "-o", out, "-n", 3, "--temperature", 0, *CLI_MODEL)
    assert r.returncode == 1 and "4 of 6 row(s) failed" in r.stderr
    got = read_jsonl(out)
    assert [g["row"] for g in got] == list(range(6))
    assert [g.get("id") for g in got] == [1, None, 3, None, 5, 6]
    assert [g["error"] is not None for g in got] == [False, True, True, True, False, True]
    assert "in.jsonl:2: not valid JSON" in got[1]["error"]
    assert "in.jsonl:4" in got[2]["error"] and "neither" in got[2]["error"]
    assert "not UTF-8" in got[3]["error"]
    assert "temperature" in got[5]["error"]
    # Each failure's code (an ErrorCode value): unreadable rows vs a bad per-row setting.
    assert [g["error_code"] for g in got] == [None, "invalid_input", "invalid_input", "invalid_input", None,
                                              "invalid_param"]
    assert got[0]["text"] == greedy(smol, ["Water boils at"], 3)[0]
    assert got[4]["text"] == greedy(smol, ["Roses are red,"], 1)[0]  # the row's own max_tokens


def test_csv_round_trip_carries_every_column_and_per_row_settings(smol, tmp_path):
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "prompt", "max_tokens", "note"])
        w.writerow(["a1", "old text", "The capital of France is", "2", "plain"])
        w.writerow(["a2", "", "Once upon a time", "", 'a "quoted", multi\nline note'])
        w.writerow(["a3", "x", "", "3", "no prompt"])
        w.writerow(["a4", "y", "1, 2, 3,", "many", "bad max_tokens"])
    r = cli("-f", src, "-o", out, "-n", 4, "--temperature", 0, *CLI_MODEL)
    assert r.returncode == 1, r.stderr
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["id", "input_text", "prompt", "max_tokens", "note", "row", "text", "finish_reason",
                            "stop_reason", "prompt_tokens", "completion_tokens", "error", "error_code"]
    assert [g["id"] for g in got] == ["a1", "a2", "a3", "a4"]
    assert [g["input_text"] for g in got] == ["old text", "", "x", "y"]  # renamed, not lost
    assert got[1]["note"] == 'a "quoted", multi\nline note'
    assert [g["text"] for g in got[:2]] == [greedy(smol, ["The capital of France is"], 2)[0],
                                            greedy(smol, ["Once upon a time"], 4)[0]]
    assert [g["completion_tokens"] for g in got[:2]] == ["2", "4"]
    assert "neither" in got[2]["error"] and "max_tokens" in got[3]["error"]
    assert [g["finish_reason"] for g in got] == ["length", "length", "error", "error"]
    assert [g["error_code"] for g in got] == ["", "", "invalid_input", "invalid_param"]  # CSV: null is ""


def test_parquet_round_trip_and_resume(smol, tmp_path):
    import pyarrow as pa  # the `parquet` extra, part of `test`
    import pyarrow.parquet as pq

    prompts = [f"Item {i}: the sky is" for i in range(10)]
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.table({"id": list(range(10)), "prompt": prompts, "tags": [["t", str(i)] for i in range(10)],
                             "seed": [None] * 9 + [7]}), src)
    first = tmp_path / "first.parquet"
    pq.write_table(pq.read_table(src).slice(0, 6), first)
    s = run_file_job(smol, first, out, max_tokens=2, temperature=0)
    assert (s.rows, s.written, s.failed) == (6, 6, 0)
    assert not os.path.exists(str(out) + JOURNAL_SUFFIX)
    # Another file is not the input the run record names: refused (rows appended to a text,
    # JSONL or CSV input are fine, test_compare.py); without a record the row checks apply.
    with pytest.raises(JobInputError, match="changed since the job started"):
        run_file_job(smol, src, out, max_tokens=2, temperature=0, resume=True)
    os.remove(str(out) + ".run.json")
    # The whole input, resumed: the first 6 rows are kept, the other 4 generated.
    s = run_file_job(smol, src, out, max_tokens=2, temperature=0, resume=True)
    assert (s.rows, s.written, s.skipped) == (10, 4, 6)
    got = pq.read_table(out).to_pylist()
    assert [g["id"] for g in got] == list(range(10)) and got[3]["tags"] == ["t", "3"]
    assert [g["text"] for g in got] == greedy(smol, prompts, 2)
    assert [g["row"] for g in got] == list(range(10)) and got[9]["seed"] == 7
    # A torn journal (a job killed while writing its Parquet output) resumes too.
    journal = str(out) + JOURNAL_SUFFIX
    lines = Path(tmp_path / "ref.jsonl")
    run_file_job(smol, src, lines, max_tokens=2, temperature=0)
    data = lines.read_bytes()
    Path(journal).write_bytes(data[:data.index(b"\n", len(data) // 2) + 20])  # 5-6 rows, then half a row
    out.unlink()
    s = run_file_job(smol, src, out, max_tokens=2, temperature=0, resume=True)
    assert s.rows == 10 and 0 < s.skipped < 10
    assert pq.read_table(out).to_pylist() == got
    with pytest.raises(JobInputError, match="--overwrite"):
        run_file_job(smol, src, out, max_tokens=2)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_kill_at_any_byte_leaves_an_output_that_resumes_cleanly(fmt, tmp_path):
    """Whatever byte a SIGKILL stops the writing at, the scan keeps exactly the whole rows."""
    from parallel_gen.jobs.formats import OutputFormat
    from parallel_gen.jobs.sinks import WriteMode, open_sink

    path = str(tmp_path / f"out.{fmt}")
    sink, _ = open_sink(path, OutputFormat(fmt), WriteMode.NEW)
    ends = []
    for i in range(3):
        sink.write({"id": i, "note": f'a "quoted",\nmulti-line cell {i}', "row": i, "text": "é" * i})
        ends.append(os.path.getsize(path))
    sink.close()
    full = Path(path).read_bytes()
    header = full.index(b"\n") + 1 if fmt == "csv" else 0  # a whole CSV header is kept
    for cut in range(len(full) + 1):
        Path(path).write_bytes(full[:cut])
        sink, point = open_sink(path, OutputFormat(fmt), WriteMode.RESUME)
        sink.close()
        whole = sum(end <= cut for end in ends)
        kept = ends[whole - 1] if whole else (header if cut >= header else 0)
        assert (point.rows_done, Path(path).read_bytes()) == (whole, full[:kept])
        if whole:
            assert point.last["id"] in (whole - 1, str(whole - 1))


def test_resume_refuses_the_output_of_another_input(smol, tmp_path):
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "out.jsonl"
    write_jsonl(a, [{"id": i, "prompt": f"A {i}"} for i in range(4)])
    write_jsonl(b, [{"id": i + 100, "prompt": f"B {i}"} for i in range(6)])
    run_file_job(smol, a, out, max_tokens=1, temperature=0)
    with pytest.raises(JobInputError, match="another input"):
        run_file_job(smol, b, out, max_tokens=1, temperature=0, resume=True)
    assert len(read_jsonl(out)) == 4


def test_jsonl_on_stdin_is_detected(smol):
    """Issue 14: JSONL on stdin (or in a file not named *.jsonl) was read as text."""
    r = cli("-n", 2, "--temperature", 0, *CLI_MODEL, stdin='\n{"prompt": "Hi", "id": 7}\n{"prompt": "Bye"}\n')
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(g["prompt"], g.get("id")) for g in got] == [("Hi", 7), ("Bye", None)]
    assert [g["text"] for g in got] == greedy(smol, ["Hi", "Bye"], 2)
    r = cli("-", "-n", 2, "--temperature", 0, *CLI_MODEL, stdin='{"messages": [{"role": "user", "content": "Hi"}]}\n')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["messages"][0]["content"] == "Hi"
    # A JSON object without the field is not silently generated for as text: an error that
    # says what to do, before any work; the prompt field named, or text asked for, it runs.
    r = cli("-n", 1, "--temperature", 0, *CLI_MODEL, stdin='{"note": "Hi"}\n')
    assert r.returncode == 2 and r.stdout == "", r
    assert "JSON object without a 'prompt' or 'messages' field" in r.stderr and "'note'" in r.stderr
    assert "--prompt-column" in r.stderr and "--input-format text" in r.stderr
    r = cli("-n", 1, "--temperature", 0, "--prompt-column", "note", *CLI_MODEL, stdin='{"note": "Hi"}\n')
    assert r.returncode == 0 and json.loads(r.stdout)["text"] == greedy(smol, ["Hi"], 1)[0], r.stderr
    r = cli("-n", 1, "--temperature", 0, "--input-format", "text", *CLI_MODEL, stdin='{"note": 1}\n')
    assert json.loads(r.stdout)["prompt"] == '{"note": 1}'


# -- memory sized to the work -------------------------------------------------------------
def test_cli_sizes_n_ctx_to_the_work_and_later_rows_that_do_not_fit_say_so(smol, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"prompt": f"Short prompt {i}"} for i in range(8)] + [{"prompt": "word " * 300}]
    write_jsonl(src, rows)
    r = cli("-f", src, "-o", out, "-n", 2, "--temperature", 0, "--n-parallel", 2, "--lookahead", 4, "--threads", 1,
            "--stats")
    assert r.returncode == 1, r.stderr
    assert "n_ctx 256" in r.stderr  # not the 4096 default: 2 x 5 prompt tokens + 2, rounded up to 256
    got = read_jsonl(out)
    assert [g["error"] is None for g in got] == [True] * 8 + [False]
    assert "--n-ctx 512 or more" in got[8]["error"]
    assert [g["text"] for g in got[:8]] == greedy(smol, [r["prompt"] for r in rows[:8]], 2)


@pytest.mark.parametrize("lookahead, chat", [(16, False), (3, False), (3, True)])
def test_a_file_job_tokenizes_each_row_once(smol, smollm2_path, tmp_path, monkeypatch, lookahead, chat):
    """Sizing the context (the first look-ahead rows), checking a later row against it and
    running it read one tokenization per row: counted on Model.tokenize. lookahead 16: the
    sample is every row; 3: later rows are checked against the sized context; chat: the
    rows' conversations are rendered (and tokenized) once too."""
    calls = []
    tokenize = pg.Model.tokenize

    def counting(self, text, *args, **kwargs):
        calls.append(text)
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(pg.Model, "tokenize", counting)
    prompts = [f"Row {i} says hello" for i in range(7)] + ["Row 1 says hello"]  # a repeated prompt is its own row
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": p} for p in prompts])
    s = run_file_job(smollm2_path, src, out, max_tokens=2, temperature=0, lookahead=lookahead, chat=chat,
                     model_options=dict(n_parallel=2, n_threads=1))
    assert (s.rows, s.failed) == (8, 0)
    rows = [c for c in calls if "says hello" in c]
    assert len(rows) == len(prompts), rows  # one per row, whichever path it took
    if chat:
        assert all(p in text and text != p for p, text in zip(prompts[:7], rows[:7])), rows  # rendered
    else:
        assert sorted(rows) == sorted(prompts)
    monkeypatch.undo()
    if not chat:  # the tokens handed on are the prompt's own: the same outputs
        assert [g["text"] for g in read_jsonl(out)] == greedy(smol, prompts, 2)


KV_LOG = """
import re, sys, parallel_gen as pg
m = pg.Model(sys.argv[1], n_parallel=3, n_ctx=300, n_threads=1, type_k=sys.argv[2], type_v=sys.argv[2], verbose=True)
print(m.kv_bytes)
"""


@pytest.mark.parametrize("model, kv_type", [("smollm2", "f16"), ("smollm2", "q8_0"), ("gemma3", "f16")])
def test_kv_bytes_equal_what_llama_cpp_allocates(model, kv_type, smollm2_path, gemma3_path):
    path = smollm2_path if model == "smollm2" else gemma3_path
    r = subprocess.run([sys.executable, "-c", KV_LOG, str(path), kv_type], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=PYTHON_DIR))
    assert r.returncode == 0, r.stderr
    import re

    # llama.cpp's own report of each KV cache it creates (Gemma 3: a full and a sliding-window one).
    sizes = [float(x) for x in re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", r.stderr)]
    assert sizes, r.stderr
    assert int(r.stdout) / 2**20 == pytest.approx(sum(sizes), abs=0.01 * len(sizes))


def test_default_n_ctx_never_takes_more_than_half_the_available_memory(smollm2_path, monkeypatch, caplog):
    from parallel_gen import model as model_module

    with pg.Model(smollm2_path, n_parallel=2, n_threads=1) as m:
        assert m.n_ctx == 4096  # plenty of memory: the usual default
    per_token = m.kv_bytes // (3 * 4096)
    monkeypatch.setattr(model_module, "available_memory", lambda: 3 * 1024 * per_token * 2)
    with caplog.at_level("WARNING", logger="parallel_gen"):
        with pg.Model(smollm2_path, n_parallel=2, n_threads=1) as m:
            assert m.n_ctx == 1024 and m.kv_bytes == 3 * 1024 * per_token
    assert "default n_ctx 4096 lowered to 1024" in caplog.text
    with pg.Model(smollm2_path, n_parallel=2, n_threads=1, n_ctx=2048) as m:
        assert m.n_ctx == 2048  # an explicit n_ctx is never changed


def test_generate_parallel_opening_a_path_sizes_n_ctx_to_the_prompts(smollm2_path, caplog):
    with caplog.at_level("INFO", logger="parallel_gen"):
        r = pg.generate_parallel(str(smollm2_path), ["Hi", "word " * 300], max_tokens=2, temperature=0)
    assert "n_ctx 512 sized to the work" in caplog.text  # 301 prompt tokens + 2, rounded up; not 4096
    assert [c.finish_reason for c in r] == ["length", "length"]


def test_csv_messages_column_and_a_custom_prompt_column(smol, tmp_path):
    src, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    conv = [{"role": "user", "content": "Name a fruit."}]
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "conversation"])
        w.writerow(["Water boils at", ""])
        w.writerow(["", json.dumps(conv)])
        w.writerow(["", "[not json"])
    s = run_file_job(smol, src, out, prompt_column="review", messages_column="conversation", max_tokens=3,
                     temperature=0)
    assert (s.rows, s.failed) == (3, 1)
    got = read_jsonl(out)
    assert [g["review"] for g in got] == ["Water boils at", "", ""]  # carried as read
    assert got[0]["text"] == greedy(smol, ["Water boils at"], 3)[0]
    assert got[1]["text"] == pg.chat_parallel(smol, [conv], max_tokens=3, temperature=0)[0].text
    assert "'conversation' cell is not JSON" in got[2]["error"]


def test_a_fatal_llama_cpp_failure_mid_job_keeps_the_rows_written(smol, tmp_path):
    prompts = [f"Item {i}: the sky is" for i in range(40)]
    src, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    src.write_text("\n".join(prompts) + "\n")
    smol._inject_abort(12)  # llama.cpp's abort callback fires in the 12th decode from now
    with pytest.raises(pg.GenerationError):
        run_file_job(smol, src, out, max_tokens=3, temperature=0, lookahead=8)
    kept = read_jsonl(out)
    assert 0 < len(kept) < 40 and [k["row"] for k in kept] == list(range(len(kept)))
    s = run_file_job(smol, src, out, max_tokens=3, temperature=0, resume=True)
    assert (s.skipped, s.rows) == (len(kept), 40)
    assert [g["text"] for g in read_jsonl(out)] == greedy(smol, prompts, 3)


def test_rows_parquet_cannot_hold_stay_in_the_journal(smol, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    write_jsonl(src, [{"id": 1, "prompt": "Water boils at"}, {"id": "b", "prompt": "Roses are red,"}])
    with pytest.raises(JobInputError, match="every row is kept in .*journal"):
        run_file_job(smol, src, out, max_tokens=1, temperature=0)
    assert [g["id"] for g in read_jsonl(str(out) + JOURNAL_SUFFIX)] == [1, "b"]
    assert not out.exists()


# -- output columns are the job's, not a row's (issue 20, bug 2) -------------------------
OPTIONAL = ["samples", "logprobs", "cumulative_logprob"]


def test_columns_follow_the_job_even_when_the_first_row_fails(smol, tmp_path):
    """samples and logprobs asked for: every row has both columns, in CSV (whose header is
    written with the first row), JSONL and Parquet alike, though the first row failed
    (its logprobs are null; its samples say why each failed)."""
    import pyarrow.parquet as pq

    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"id": 0, "prompt": None}, {"id": 1, "prompt": "The capital of France is"},
                      {"id": 2, "prompt": "Roses are red,"}])
    outs = {fmt: tmp_path / f"out.{fmt}" for fmt in ("csv", "jsonl", "parquet")}
    for out in outs.values():
        s = run_file_job(smol, src, out, max_tokens=2, temperature=0, n=2, logprobs=1)
        assert (s.rows, s.failed) == (3, 1)
    with open(outs["csv"], newline="") as f:
        rows = {"csv": list(csv.DictReader(f)), "jsonl": read_jsonl(outs["jsonl"]),
                "parquet": pq.read_table(outs["parquet"]).to_pylist()}
    ref = pg.generate_parallel(smol, ["The capital of France is", "Roses are red,"], max_tokens=2, temperature=0,
                               n=2, logprobs=1)
    for fmt, got in rows.items():
        assert all(list(g)[-3:] == OPTIONAL for g in got), fmt
        assert got[0]["finish_reason"] == "error", fmt
        assert got[0]["logprobs"] in (None, "") and got[0]["cumulative_logprob"] in (None, ""), fmt
        failed = json.loads(got[0]["samples"]) if fmt == "csv" else got[0]["samples"]
        assert [x["finish_reason"] for x in failed] == ["error", "error"], fmt  # each sample says why
        assert got[0]["error_code"] == "invalid_input" and got[1]["error_code"] in (None, ""), fmt
        assert [x["error_code"] for x in failed] == ["invalid_input"] * 2, fmt
        for g, c in zip(got[1:], ref):
            samples = json.loads(g["samples"]) if fmt == "csv" else g["samples"]
            logprobs = json.loads(g["logprobs"]) if fmt == "csv" else g["logprobs"]
            assert [x["text"] for x in samples] == [o.text for o in c.outputs], fmt
            tokens = [(p["token"], p["logprob"]) if fmt == "parquet" else tuple(p) for p in logprobs]
            assert tokens == [(t.token, pytest.approx(t.logprob)) for t in c.outputs[0].logprobs], fmt
            assert float(g["cumulative_logprob"]) == pytest.approx(c.outputs[0].cumulative_logprob), fmt
    # a job without them has neither column, in any row
    out = tmp_path / "plain.jsonl"
    run_file_job(smol, src, out, max_tokens=2, temperature=0)
    assert all(not set(OPTIONAL) & set(g) for g in read_jsonl(out))


def test_a_row_setting_that_needs_a_column_the_job_lacks_is_that_rows_error(smol, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "Water boils at", "n": 3}, {"prompt": "Water boils at", "logprobs": 2},
                      {"prompt": "Water boils at", "n": 1, "logprobs": None}])
    s = run_file_job(smol, src, out, max_tokens=2, temperature=0)
    got = read_jsonl(out)
    assert s.failed == 2 and [g["finish_reason"] for g in got] == ["error", "error", "length"]
    assert "n=3 needs the 'samples' column" in got[0]["error"] and "--samples" in got[0]["error"]
    assert "'logprobs' column" in got[1]["error"] and "--logprobs" in got[1]["error"]
    assert [g["error_code"] for g in got] == ["invalid_param", "invalid_param", None]
    assert all(list(g)[-1] == "error_code" for g in got)  # no row gained a column
    # A job with samples: a row may ask for fewer (its samples list is shorter).
    s = run_file_job(smol, src, out, max_tokens=2, temperature=0, n=2, logprobs=0, overwrite=True)
    got = read_jsonl(out)
    assert s.failed == 0 and [len(g["samples"]) for g in got] == [3, 2, 1]
    assert [len(g["logprobs"]) for g in got] == [2, 2, 2]


def test_resume_refuses_an_output_written_with_other_columns(smol, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": f"Item {i}:"} for i in range(3)])
    first = tmp_path / "first.jsonl"
    write_jsonl(first, [{"prompt": "Item 0:"}])
    run_file_job(smol, first, out, max_tokens=1, temperature=0, logprobs=1)
    with pytest.raises(JobInputError,
                       match=r"the columns \['logprobs', 'cumulative_logprob'\].*--samples / --logprobs"):
        run_file_job(smol, src, out, max_tokens=1, temperature=0, resume=True)
    with pytest.raises(JobInputError, match="no column 'samples'"):
        run_file_job(smol, src, out, max_tokens=1, temperature=0, logprobs=1, n=2, resume=True)
    s = run_file_job(smol, src, out, max_tokens=1, temperature=0, logprobs=1, resume=True)
    assert (s.rows, s.skipped) == (3, 1)


def test_a_file_job_reads_and_fills_the_result_cache(smollm2_path, tmp_path):
    """With a result cache, rows whose result is a function of their inputs (greedy, or a
    seed given) are stored by the first run and answered from the cache by the next, with
    no decode; a sampled row without a seed is never stored. Counted in generated tokens."""
    prompts = [f"Fact {i}: the river" for i in range(5)]
    rows = [{"prompt": p} for p in prompts]
    rows += [{"prompt": "A seeded tale", "temperature": 0.8, "seed": 7},
             {"prompt": "An unseeded tale", "temperature": 0.8}]
    src = tmp_path / "in.jsonl"
    write_jsonl(src, rows)
    cache = tmp_path / "cache"
    # No KV reuse across rows: every greedy row's prefill is whole, so every one is stored.
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256, n_threads=1, prompt_cache=False,
                  share_prefix=False) as m:
        s1 = run_file_job(m, src, tmp_path / "one.jsonl", max_tokens=6, temperature=0, ignore_eos=True,
                          cache=cache)
        before = m.stats().tokens_generated
        s2 = run_file_job(m, src, tmp_path / "two.jsonl", max_tokens=6, temperature=0, ignore_eos=True,
                          cache=cache)
        generated = m.stats().tokens_generated - before
    assert (s1.written, s1.failed, s2.written, s2.failed) == (7, 0, 7, 0)
    assert generated == 6  # only the unseeded sampled row ran again
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert [r["text"] for r in one[:6]] == [r["text"] for r in two[:6]]
    assert all(r["completion_tokens"] == 6 and r["error"] is None for r in two)
    assert [r["text"] for r in one[:5]] == greedy_texts(smollm2_path, prompts)


def greedy_texts(path, prompts):
    with pg.Model(path, n_parallel=2, n_ctx=256, n_threads=1) as m:
        return pg.generate_parallel(m, prompts, max_tokens=6, temperature=0, ignore_eos=True).texts
