"""`parallel-gen classify`: label probabilities of a file of texts, streamed and resumable.

Real CLI subprocesses on SmolLM2. Their probabilities are compared with pg.classify in
this process on the same texts: with flash attention and separate KV streams a text's
probabilities do not depend on the batch around it (tests/test_scoring.py), so they agree
to rounding whatever rows share a decode.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import math
import os
import subprocess
import sys
import time

import pytest

import parallel_gen as pg
from test_jobs import PYTHON_DIR, read_jsonl, write_jsonl

# One thread and the same n_ctx and flash attention in this process and in the CLI.
MODEL = dict(n_parallel=4, n_ctx=256, n_threads=1, flash_attn=True)
CLI_MODEL = ["--n-parallel", 4, "--n-ctx", 256, "--threads", 1, "--flash-attn", "on"]
LABELS = ["positive", "negative", "neutral"]
TOL = 1e-6

ADJECTIVES = ["wonderful", "awful", "ordinary", "delightful", "broken", "fine", "terrible", "great"]
THINGS = ["movie", "pizza", "hotel room", "phone", "concert", "book"]


def texts(n):
    return [f"Review {i}: the {THINGS[i % len(THINGS)]} was {ADJECTIVES[i % len(ADJECTIVES)]}." for i in range(n)]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with pg.Model(smollm2_path, **MODEL) as m:
        yield m


def parallel_gen_cli(command, *args, background=False, timeout=300):
    """`parallel-gen COMMAND ARGS` in a subprocess: its result, or (background) the running process."""
    argv = [sys.executable, "-m", "parallel_gen", command, *map(str, args)]
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    if background:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
    return subprocess.run(argv, input="", capture_output=True, text=True, env=env, timeout=timeout)


def classify_cli(*args, background=False, timeout=300):
    return parallel_gen_cli("classify", *args, background=background, timeout=timeout)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_probabilities(got_rows, expected, labels, cast=float):
    """Each row's p_<label> columns equal pg.classify's probabilities and sum to 1."""
    assert len(got_rows) == len(expected)
    for row, exp in zip(got_rows, expected):
        assert exp.error is None and row["error"] in (None, "")
        probs = [cast(row[f"p_{lab}"]) for lab in labels]
        assert math.fsum(probs) == pytest.approx(1.0, abs=TOL)
        assert probs == pytest.approx([exp.probs[lab] for lab in labels], abs=TOL)
        assert row["label"] == exp.label


def test_jsonl_in_and_out_equal_classify_in_process(smol, tmp_path):
    items = texts(12)
    # "label" and "row" are output columns: the input's own are kept as input_label, input_row.
    rows = [{"id": f"r{i}", "text": t, "label": "gold", "row": 100 + i} for i, t in enumerate(items)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, rows)
    r = classify_cli("-f", src, "-o", out, "--labels", " positive, negative ,neutral", *CLI_MODEL)
    assert r.returncode == 0, r.stderr
    got = read_jsonl(out)
    assert [list(g) for g in got] == [["id", "text", "input_label", "input_row", "row", "label", "p_positive",
                                       "p_negative", "p_neutral", "error", "error_code"]] * len(rows)
    assert [g["row"] for g in got] == list(range(len(rows)))
    assert [(g["id"], g["text"], g["input_label"], g["input_row"]) for g in got] == \
        [(r["id"], r["text"], r["label"], r["row"]) for r in rows]
    expected = pg.classify(smol, items, LABELS)
    assert_probabilities(got, expected, LABELS)
    assert {g["label"] for g in got} >= {"positive", "negative"}  # the texts are not all one label

    # The same texts as arguments, JSONL on stdout, with the job's statistics on stderr.
    r = classify_cli("--labels", ",".join(LABELS), *items[:3], "--stats", *CLI_MODEL)
    assert r.returncode == 0, r.stderr
    assert "3 rows (3 written, 0 failed)" in r.stderr and "rows/s" in r.stderr and "generated" not in r.stderr
    assert_probabilities([json.loads(line) for line in r.stdout.splitlines()], expected[:3], LABELS)


def test_csv_in_and_out_with_chat_mean_and_a_labels_file(smol, tmp_path):
    items = texts(6)
    items[2] = 'A "quoted" review, with commas,\nand a second line.'
    labels = ["good, really", "bad", "meh"]  # a comma: only --labels-file can give it
    src, out, labels_file = tmp_path / "in.csv", tmp_path / "out.csv", tmp_path / "labels.txt"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "review"])
        w.writerows([[i, t] for i, t in enumerate(items)])
    labels_file.write_text("\n".join(labels) + "\n")
    system = "You label product reviews."
    r = classify_cli("-f", src, "-o", out, "--text-column", "review", "--labels-file", labels_file, "--system",
                     system, "--normalize", "mean", *CLI_MODEL)
    assert r.returncode == 0, r.stderr
    got = read_csv(out)
    assert list(got[0]) == ["id", "review", "row", "label", "p_good, really", "p_bad", "p_meh", "error",
                            "error_code"]
    assert [(g["id"], g["review"], g["row"]) for g in got] == [(str(i), t, str(i)) for i, t in enumerate(items)]
    expected = pg.classify(smol, items, labels, chat=True, system=system, normalize="mean")
    assert_probabilities(got, expected, labels)


def test_resume_after_sigkill_mid_job_equals_an_uninterrupted_run(smol, tmp_path):
    items = texts(48)
    template = "Review: {text}\nSentiment:"  # short prompts: a short test
    src, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    src.write_text("\n".join(items) + "\n")
    args = ["-f", src, "-o", out, "--labels", ",".join(LABELS), "--template", template, *CLI_MODEL]
    # The uninterrupted run, in this process while the job runs in another (two cores).
    reference = concurrent.futures.ThreadPoolExecutor(1).submit(pg.classify, smol, items, LABELS, template=template)
    proc = classify_cli(*args, background=True)
    t0 = time.time()
    while (out.read_bytes().count(b"\n") if out.exists() else 0) < 6:  # rows appear while it runs
        assert proc.poll() is None, f"the job ended before 6 rows: {proc.communicate()}"
        assert time.time() - t0 < 300, "no progress"
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no chance to tidy up, often mid-write
    proc.wait()
    done = out.read_bytes().count(b"\n")
    assert 6 <= done < len(items), "the job was not stopped mid-way: make it longer"
    r = classify_cli(*args, "--resume", "-v")
    assert r.returncode == 0, r.stderr
    assert f"resuming after {done} rows" in r.stderr
    got = read_jsonl(out)
    assert [g["row"] for g in got] == list(range(len(items)))  # every row once, in order
    assert [g["text"] for g in got] == items
    assert_probabilities(got, reference.result(), LABELS)


def test_resume_of_a_csv_cut_to_k_rows_and_a_torn_record(tmp_path):
    items = texts(10)
    src, out = tmp_path / "in.txt", tmp_path / "out.csv"
    src.write_text("\n".join(items) + "\n")
    args = ["-f", src, "-o", out, "--labels", ",".join(LABELS), *CLI_MODEL]
    r = classify_cli(*args)
    assert r.returncode == 0, r.stderr
    full = out.read_bytes()
    lines = full.splitlines(keepends=True)  # header + one line per record (no multi-line cells here)
    k = 4
    out.write_bytes(b"".join(lines[:1 + k]) + lines[1 + k][:25])  # k rows, then a row cut short
    r = classify_cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "torn" in r.stderr
    reference, resumed = read_csv_bytes(full), read_csv(out)
    assert [g["row"] for g in resumed] == [str(i) for i in range(len(items))]
    for a, b in zip(resumed, reference):
        assert a.keys() == b.keys() and a["label"] == b["label"]
        assert [float(a[f"p_{lab}"]) for lab in LABELS] == pytest.approx([float(b[f"p_{lab}"]) for lab in LABELS],
                                                                         abs=TOL)
    # Other labels cannot continue this output, nor one killed after its header only.
    r = classify_cli("-f", src, "-o", out, "--labels", "yes,no", *CLI_MODEL, "--resume")
    assert r.returncode == 2 and "other --labels" in r.stderr and "Traceback" not in r.stderr
    out.write_bytes(lines[0])
    r = classify_cli("-f", src, "-o", out, "--labels", "yes,no", *CLI_MODEL, "--resume")
    assert r.returncode == 2 and "other --labels" in r.stderr and out.read_bytes() == lines[0]


def read_csv_bytes(data):
    return list(csv.DictReader(data.decode("utf-8").splitlines()))


def test_a_text_too_long_for_the_context_or_missing_is_a_row_error_and_the_others_are_fine(smol, tmp_path):
    items = texts(6)
    items[3] = "Tell me about it. " * 80  # about 400 tokens: more than n_ctx 256
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"text": t} for t in items] + [{"body": "no text field"}])
    r = classify_cli("-f", src, "-o", out, "--labels", ",".join(LABELS), *CLI_MODEL)
    assert r.returncode == 1 and "2 of 7 row(s) failed" in r.stderr and "Traceback" not in r.stderr
    got = read_jsonl(out)
    too_long, missing = got[3], got[6]
    assert "n_ctx" in too_long["error"] and f"{src}:4" in too_long["error"]
    assert "'text' is missing" in missing["error"] and "--text-column" in missing["error"]
    # The codes of the failures, for programs (ErrorCode values); a good row has none.
    assert [g["error_code"] for g in got] == [None] * 3 + ["prompt_too_long"] + [None] * 2 + ["invalid_input"]
    assert missing["body"] == "no text field"
    for bad in (too_long, missing):
        assert bad["label"] is None and all(bad[f"p_{lab}"] is None for lab in LABELS)
    ok = [0, 1, 2, 4, 5]
    assert_probabilities([got[i] for i in ok], pg.classify(smol, [items[i] for i in ok], LABELS), LABELS)

    # Without --n-ctx the context is sized from the first rows (--lookahead 2: two rows);
    # a later row that does not fit says which --n-ctx it needs.
    r = classify_cli("-f", src, "-o", out, "--overwrite", "--labels", ",".join(LABELS), "--lookahead", 2,
                     "--n-parallel", 2, "--threads", 1)
    assert r.returncode == 1, r.stderr
    got = read_jsonl(out)
    assert "--n-ctx" in got[3]["error"] and got[3]["error_code"] == "prompt_too_long"
    assert [g["error"] is None for g in got] == [True, True, True, False, True, True, False]


@pytest.mark.parametrize("args, message", [
    (["--labels", "yes,no,yes"], "--labels 'yes,no,yes': labels[2]='yes' is a duplicate"),
    (["--labels", "yes,,no"], "--labels 'yes,,no': labels[1] is empty"),
    (["--labels", ""], "--labels '': labels[0] is empty"),
    (["--labels-file", "{tmp}/empty.txt"], "labels is empty"),
    (["--labels-file", "{tmp}/absent.txt"], "--labels-file {tmp}/absent.txt: cannot read it"),
    (["--labels", "yes,no", "--text-column", "body"], "no 'body' column in the header"),
    (["--labels", "yes,no", "--template", "Is it good?"], "--template: template='Is it good?' has no {text}"),
    ([], "one of the arguments --labels --labels-file is required"),
])
def test_bad_arguments_exit_2_with_a_message_naming_the_flag(args, message, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    src, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    src.write_text("id,text\n1,hello\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = classify_cli("-f", src, "-o", out, *args, *CLI_MODEL)
    assert r.returncode == 2, r.stderr
    assert message.replace("{tmp}", str(tmp_path)) in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()  # nothing written before the arguments are checked


def test_json_lines_without_the_text_field_are_an_error_not_texts(tmp_path):
    src, out = tmp_path / "reviews", tmp_path / "out.jsonl"  # no telling extension: auto-detected
    src.write_text('{"review": "Great."}\n{"review": "Bad."}\n')
    r = classify_cli("-f", src, "-o", out, "--labels", "yes,no", *CLI_MODEL)
    assert r.returncode == 2 and not out.exists(), r.stderr
    assert "without a 'text' field (its fields: 'review')" in r.stderr and "--text-column" in r.stderr


def test_a_base_model_classifies_in_chat_mode_with_a_chat_template_flag(gemma3_path, tmp_path):
    """Gemma 3 270M has no chat template: --chat alone fails before any row; a built-in
    template named by --chat-template (which implies --chat) gives pg.classify's results."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"text": t} for t in texts(3)])
    base = ["-f", src, "-o", out, "--labels", "positive,negative", "-m", gemma3_path, *CLI_MODEL[:-4]]
    r = classify_cli(*base, "--chat")
    assert r.returncode == 2 and "chat template" in r.stderr and "--chat-template" in r.stderr, r.stderr
    assert not out.exists() or out.read_text() == ""
    r = classify_cli(*base, "--overwrite", "--chat-template", "chatml")
    assert r.returncode == 0, r.stderr
    with pg.Model(gemma3_path, n_parallel=4, n_ctx=256, n_threads=1) as m:
        want = pg.classify(m, texts(3), ["positive", "negative"], chat=True, chat_template="chatml")
    got = read_jsonl(out)
    for row, exp in zip(got, want):
        # Gemma's CPU kernels are not batch-size invariant (README): close, not equal
        assert row["p_positive"] == pytest.approx(exp.probs["positive"], abs=0.05)
        assert row["p_positive"] + row["p_negative"] == pytest.approx(1.0, abs=1e-9)


def test_existing_output_is_protected(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    r = classify_cli("--labels", "yes,no", "Hello", "-o", out, *CLI_MODEL)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "--resume" in r.stderr
    assert out.read_text() == "precious\n"


def test_classify_file_parquet_in_and_out_from_python(smol, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from parallel_gen.jobs import classify_file

    items = texts(5)
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.table({"n": list(range(5)), "body": items}), src)
    summary = classify_file(smol, src, out, ["yes", "no"], text_column="body", template="{text} Good? ")
    assert (summary.rows, summary.failed) == (5, 0)
    got = pq.read_table(out).to_pylist()
    assert [(g["n"], g["body"], g["row"]) for g in got] == [(i, t, i) for i, t in enumerate(items)]
    assert_probabilities(got, pg.classify(smol, items, ["yes", "no"], template="{text} Good? "), ["yes", "no"])


@pytest.mark.parametrize("lookahead, chat", [(16, False), (3, False), (3, True)])
def test_a_classify_job_tokenizes_each_row_once(smol, smollm2_path, tmp_path, monkeypatch, lookahead, chat):
    """Sizing the context on the first look-ahead rows and classifying them read one
    tokenization of each row's prompt (counted on Model.tokenize); the probabilities are
    those pg.classify gives. lookahead 16: every row is in the sample; 3: later rows are
    tokenized when classified; chat: the rows' conversations are rendered once too."""
    from parallel_gen.jobs import classify_file

    items = [f"Row {i} says hello, the film was {'great' if i % 2 else 'dull'}." for i in range(7)]
    items.append(items[1])  # a repeated text is its own row
    calls = []
    tokenize = pg.Model.tokenize

    def counting(self, text, *args, **kwargs):
        calls.append(text)
        return tokenize(self, text, *args, **kwargs)

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"text": t} for t in items])
    monkeypatch.setattr(pg.Model, "tokenize", counting)
    s = classify_file(smollm2_path, src, out, LABELS, chat=chat, lookahead=lookahead,
                      model_options=dict(n_parallel=2, n_threads=1))
    monkeypatch.undo()
    assert (s.rows, s.failed) == (len(items), 0)
    rows = [c for c in calls if "says hello" in c]
    assert len(rows) == len(items), rows  # one per row, whichever path it took
    assert_probabilities(read_jsonl(out), pg.classify(smol, items, LABELS, chat=chat), LABELS, cast=float)
