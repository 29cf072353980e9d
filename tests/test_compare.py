"""pg.compare and `parallel-gen compare` / `agreement` on the labelled set tests/data/reviews_gold.csv
(36 short reviews, gold sentiment), with the two test models; and the run record every
file job writes (OUTPUT.run.json).

A compare's codings are classify's, call for call: in this process they are compared with
pg.classify on the same open Model; the CLI's (another process, one thread, flash
attention: see test_classify_cli.py) agree with them to rounding.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest

import parallel_gen as pg
from conftest import import_extra
from test_classify_cli import parallel_gen_cli as cli, read_csv  # `parallel-gen COMMAND ...`

import_extra("sklearn", "annotate")

DATA = Path(__file__).parent / "data" / "reviews_gold.csv"
LABELS = ["positive", "negative", "neutral"]
TEMPLATES = {"plain": "Text: {text}\nSentiment ({labels}):", "review": "Review: {text}\nThe review is"}
MODEL = dict(n_parallel=4, n_ctx=256, n_threads=1, flash_attn=True, prompt_cache=False)
CLI_MODEL = ["--n-parallel", 4, "--n-ctx", 256, "--threads", 1, "--flash-attn", "on", "--no-prompt-cache"]
TOL = 1e-6


def write_reviews(path, texts, gold):
    """A CSV input of ``texts`` with their ``gold`` labels (columns text, gold)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "gold"])
        w.writerows(zip(texts, gold))


def reviews():
    with open(DATA, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["gold"] for r in rows]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def smol1(smollm2_path):
    with pg.Model(smollm2_path, **MODEL) as m:
        yield m


@pytest.fixture(scope="module")
def gemma1(gemma3_path):
    with pg.Model(gemma3_path, **MODEL) as m:
        yield m


@pytest.fixture(scope="module")
def study(smol1, gemma1):
    texts, gold = reviews()
    return pg.compare({"smollm2": smol1, "gemma3": gemma1}, texts, LABELS, gold, TEMPLATES, seed=1)


def test_compare_is_classify_per_model_and_template_and_agreement_of_its_codings(study, smol1, gemma1):
    texts, gold = reviews()
    assert [c.name for c in study.coders] == ["smollm2/plain", "smollm2/review", "gemma3/plain", "gemma3/review"]
    assert len(study.codings) == 4 * len(texts) and study.gold == gold
    for coder, model in zip(study.coders, (smol1, smol1, gemma1, gemma1)):
        expected = pg.classify(model, texts, LABELS, template=TEMPLATES[coder.template])
        got = [c for c in study.codings if c.coder == coder.name]
        assert [c.item for c in got] == list(range(len(texts)))
        assert [c.label for c in got] == [e.label for e in expected]
        for c, e in zip(got, expected):
            assert c.error is None and [c.probs[lab] for lab in LABELS] == pytest.approx(
                [e.probs[lab] for lab in LABELS], abs=TOL)
    assert study.agreement.to_dict() == pg.agreement(study.wide(), gold, labels=LABELS, seed=1).to_dict()
    assert pg.agreement(study, seed=1).to_dict() == study.agreement.to_dict()  # a result carries its gold
    row = study.rows()[0]
    assert list(row) == ["item", "coder", "model", "template", "gold", "label", "p_positive", "p_negative",
                         "p_neutral", "error"]
    assert sum(row[f"p_{lab}"] for lab in LABELS) == pytest.approx(1.0)


def test_compare_opens_models_from_paths_one_at_a_time(smollm2_path, gemma3_path):
    texts, gold = reviews()
    texts, gold = texts[:6], gold[:6]
    r = pg.compare([str(smollm2_path), str(gemma3_path)], texts, LABELS, gold, ci=None,
                   model_options={"n_parallel": 2, "n_threads": 1})
    assert [c.name for c in r.coders] == [Path(smollm2_path).stem, Path(gemma3_path).stem]
    assert all(c.error is None and c.label in LABELS for c in r.codings)
    assert [s.n for s in r.agreement.gold] == [6, 6] and r.agreement.alpha is not None
    # one model, no gold: codings and no agreement
    r = pg.compare(str(smollm2_path), texts[:2], LABELS, model_options={"n_parallel": 2})
    assert r.agreement is None and len(r.codings) == 2


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(gold=["positive"] * 35 + ["great"]), pg.ParamError, "gold label 'great' .item 35. is not one of"),
    (dict(gold=["positive"] * 35 + [None]), pg.ParamError, "gold has no label for 1 of 36"),
    (dict(gold=["positive"] * 3), pg.ParamError, "gold has 3 labels for 36 items"),
    (dict(templates={"bad": "no text field"}), ValueError, r"templates\['bad'\]: .* no \{text\} field"),
    (dict(templates={}), pg.ParamError, "templates is empty"),
    (dict(models=["/no/such/a.gguf", "/elsewhere/a.gguf"]), pg.ParamError, "two models are named 'a'"),
    (dict(models=[42]), pg.ParamTypeError, "must be a path, a Model"),
    (dict(temperature=0.5), pg.ParamTypeError, "unexpected argument"),
])
def test_bad_compare_arguments_fail_before_any_model_opens(kwargs, error, message):
    texts, _ = reviews()
    models = kwargs.pop("models", ["/no/such/model.gguf"])  # never opened: the error comes first
    with pytest.raises(error, match=message):
        pg.compare(models, texts, LABELS, **kwargs)


# -- the command line ----------------------------------------------------------------------------
def test_cli_compare_killed_mid_way_resumes_to_the_uninterrupted_result_with_its_run_record(
        smol1, smollm2_path, tmp_path):
    src, out = tmp_path / "reviews.csv", tmp_path / "codings.csv"
    shutil.copy(DATA, src)
    args = ["-f", src, "--gold-column", "gold", "--labels", ",".join(LABELS), "--models", smollm2_path,
            "--template", f"plain={TEMPLATES['plain']}", "--template", f"review={TEMPLATES['review']}",
            "-o", out, "--report", tmp_path / "report.json", "--plot", tmp_path / "agreement.png", "--seed", 3,
            *CLI_MODEL]
    proc = cli("compare", *args, background=True)
    second = Path(str(out) + ".parts") / "01.jsonl"  # the second coder's part
    t0 = time.time()
    while (second.read_bytes().count(b"\n") if second.exists() else 0) < 3:
        assert proc.poll() is None, f"the compare ended before the second coder's 3rd row: {proc.communicate()}"
        assert time.time() - t0 < 300, "no progress"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not out.exists() and 3 <= second.read_bytes().count(b"\n") < 36
    r = cli("compare", *args)  # without --resume: refused, nothing touched
    assert r.returncode == 2 and "--resume" in r.stderr and not out.exists()
    r = cli("compare", *args, "--resume", "-v")
    assert r.returncode == 0, r.stderr
    assert "resuming after" in r.stderr and "Krippendorff's alpha" in r.stdout
    rows = read_csv(out)
    texts, gold = reviews()
    expected = pg.compare({Path(smollm2_path).stem: smol1}, texts, LABELS, gold, TEMPLATES, seed=3)
    assert [(int(g["item"]), g["coder"]) for g in rows] == [(c.item, c.coder) for c in expected.codings]
    for g, e in zip(rows, expected.codings):
        assert g["label"] == e.label and g["gold"] == gold[e.item] and g["text"] == texts[e.item]
        assert [float(g[f"p_{lab}"]) for lab in LABELS] == pytest.approx([e.probs[lab] for lab in LABELS], abs=TOL)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["coders"] == [c.name for c in expected.coders]
    assert [s["accuracy"]["value"] for s in report["gold"]] == [s.accuracy.value for s in expected.agreement.gold]
    assert (tmp_path / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    record = pg.RunRecord.read(out)
    assert record.kind == "compare" and record.input["sha256"] == sha256(src)
    assert [s["ended"] is None for s in record.segments] == [True, False]  # SIGKILL: the first never ended
    assert record.output["sha256"] == sha256(out) and record.rows == 72 and record.verify()
    assert record.models[0]["sha256"] == sha256(smollm2_path) and record.models[0]["config"]["n_ctx"] == 256
    assert record.arguments["templates"] == TEMPLATES and record.arguments["labels"] == LABELS
    # A resume against an input that changed since is refused before any work.
    src.write_text(src.read_text().replace("perfect", "dreadful"))
    r = cli("compare", *args, "--resume")
    assert r.returncode == 2 and "changed since the job started" in r.stderr and "Traceback" not in r.stderr


def counting_tokenize(monkeypatch, texts):
    """Patches Model.tokenize to count its calls on a prompt holding one of ``texts``."""
    calls = []
    tokenize = pg.Model.tokenize

    def counting(self, text, *args, **kwargs):
        calls.extend(t for t in texts if t in text)
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(pg.Model, "tokenize", counting)
    return calls


def test_a_file_compare_loads_each_model_once_for_all_its_templates(smol1, smollm2_path, tmp_path, monkeypatch):
    """One weight load for both coders, and each text tokenized once per template: the
    sizing's tokens are the ones classified (it was twice per template)."""
    from parallel_gen.study.compare_file import compare_file, parts_dir, read_codings

    texts, gold = reviews()
    src, out = tmp_path / "in.csv", tmp_path / "codings.csv"
    write_reviews(src, texts[:8], gold[:8])
    loads = []
    load = pg.Model._load  # every way of opening a Model (the constructor, open_sized) loads the weights here

    def counted(path, config):
        loads.append(str(path))
        return load(path, config)

    monkeypatch.setattr(pg.Model, "_load", staticmethod(counted))
    tokenized = counting_tokenize(monkeypatch, texts[:8])
    options = {k: v for k, v in MODEL.items() if k != "n_ctx"}  # sized to the prompts of both templates
    summary = compare_file([smollm2_path], src, out, LABELS, templates=TEMPLATES, gold_column="gold",
                           model_options=options, model_names=["smollm2"])
    assert loads == [str(smollm2_path)]  # one load for both coders (it was one per coder)
    assert sorted(tokenized) == sorted(texts[:8] * len(TEMPLATES))
    assert summary.failed == 0 and summary.rows == 16
    expected = pg.compare({"smollm2": smol1}, texts[:8], LABELS, gold[:8], TEMPLATES, ci=None)
    rows = read_codings(out)
    assert [(int(r["item"]), r["coder"], r["label"]) for r in rows] == \
        [(c.item, c.coder, c.label) for c in expected.codings]
    for r, e in zip(rows, expected.codings):
        assert [float(r[f"p_{lab}"]) for lab in LABELS] == pytest.approx([e.probs[lab] for lab in LABELS], abs=TOL)
    configs = [pg.RunRecord.read(Path(parts_dir(out)) / f"{i:02d}.jsonl").models[0]["config"] for i in (0, 1)]
    assert configs[0] == configs[1]  # both coders ran on the one Model
    # Resumed when every part is complete: joined again without loading any model.
    again = compare_file([smollm2_path], src, out, LABELS, templates=TEMPLATES, gold_column="gold",
                         model_options=options, model_names=["smollm2"], resume=True)
    assert loads == [str(smollm2_path)] and again.parts == [None, None] and read_codings(out) == rows


def test_compare_from_a_path_tokenizes_each_text_once_per_template(smol1, smollm2_path, monkeypatch):
    """pg.compare given a path sizes one Model to both templates and classifies with the
    tokens that sizing made; its probabilities are those on a Model opened beforehand."""
    texts, gold = reviews()
    tokenized = counting_tokenize(monkeypatch, texts[:6])
    options = {k: v for k, v in MODEL.items() if k != "n_ctx"}
    got = pg.compare({"smollm2": smollm2_path}, texts[:6], LABELS, gold[:6], TEMPLATES, ci=None,
                     model_options=options)
    assert sorted(tokenized) == sorted(texts[:6] * len(TEMPLATES))
    monkeypatch.undo()
    expected = pg.compare({"smollm2": smol1}, texts[:6], LABELS, gold[:6], TEMPLATES, ci=None)
    assert [(c.item, c.coder, c.label) for c in got.codings] == [(c.item, c.coder, c.label) for c in expected.codings]
    for g, e in zip(got.codings, expected.codings):
        assert [g.probs[lab] for lab in LABELS] == pytest.approx([e.probs[lab] for lab in LABELS], abs=TOL)


def test_cli_compare_rejects_gold_problems_before_work(smollm2_path, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("text,gold\nfine,positive\nbad,\n")
    base = ["-f", src, "--gold-column", "gold", "--labels", ",".join(LABELS), "--models", smollm2_path,
            "-o", tmp_path / "out.csv"]
    r = cli("compare", *base)
    assert r.returncode == 2 and "row 2" in r.stderr and "no gold label" in r.stderr
    src.write_text("text,gold\nfine,positive\nbad,awful\n")
    r = cli("compare", *base)
    assert r.returncode == 2 and "'awful' is not one of the labels" in r.stderr
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.csv.parts").exists()


def test_cli_compare_writes_parquet_that_agreement_reads(smol1, smollm2_path, tmp_path, monkeypatch):
    """-o codings.parquet: the long table typed (item an int, p_<label> doubles, an empty
    error a null), its codings pg.compare's, and `agreement` reads it back as the CSV's
    numbers. Without pyarrow, the compare is refused before any work."""
    pq = import_extra("pyarrow.parquet", "parquet")
    texts, gold = reviews()
    src, out = tmp_path / "in.csv", tmp_path / "codings.parquet"
    write_reviews(src, texts[:6], gold[:6])
    base = ["-f", src, "--gold-column", "gold", "--labels", ",".join(LABELS), "--models", f"smollm2={smollm2_path}",
            "--template", f"plain={TEMPLATES['plain']}", "--template", f"review={TEMPLATES['review']}", *CLI_MODEL,
            "--n-boot", 200]
    r = cli("compare", *base, "-o", out, "--report", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr
    table = pq.read_table(out)
    types = {f.name: str(f.type) for f in table.schema}
    assert types["item"] == "int64" and all(types[f"p_{lab}"] == "double" for lab in LABELS), types
    rows = table.to_pylist()
    expected = pg.compare({"smollm2": smol1}, texts[:6], LABELS, gold[:6], TEMPLATES, ci=None)
    assert [(r["item"], r["coder"], r["label"], r["error"]) for r in rows] == \
        [(c.item, c.coder, c.label, None) for c in expected.codings]
    for row, e in zip(rows, expected.codings):
        assert [row[f"p_{lab}"] for lab in LABELS] == pytest.approx([e.probs[lab] for lab in LABELS], abs=TOL)
    r = cli("agreement", out, "--coder-column", "coder", "--gold-column", "gold", "--labels", ",".join(LABELS),
            "--report", tmp_path / "again.json", "--n-boot", 200)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads((tmp_path / "report.json").read_text())
    # Without pyarrow: refused before the input is read or a part is written.
    from parallel_gen.study.compare_file import compare_file

    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    other = tmp_path / "other.parquet"
    with pytest.raises(pg.jobs.JobInputError, match=r"pip install 'parallel_gen\[parquet\]'"):
        compare_file([smollm2_path], src, other, LABELS, model_options=MODEL)
    assert not os.path.exists(str(other) + ".parts")


def test_cli_agreement_on_human_coders_equals_pg_agreement(tmp_path):
    path = tmp_path / "human.csv"
    rows = [("d1", "ann", "pos", "pos"), ("d1", "bob", "pos", "pos"), ("d2", "ann", "neg", "neg"),
            ("d2", "bob", "pos", "neg"), ("d3", "ann", "neu", "neu"), ("d3", "bob", "", "neu"),
            ("d4", "ann", "neg", "neg"), ("d4", "bob", "neg", "neg"), ("d5", "ann", "pos", "neu"),
            ("d5", "bob", "neu", "neu")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["doc", "annotator", "code", "truth"])
        w.writerows(rows)
    r = cli("agreement", path, "--item-column", "doc", "--coder-column", "annotator", "--label-column", "code",
            "--gold-column", "truth", "--labels", "pos,neu,neg", "--report", tmp_path / "r.json", "--n-boot", 200)
    assert r.returncode == 0, r.stderr
    assert "missing labels: bob 1" in r.stdout
    records = [dict(zip(["doc", "annotator", "code", "truth"], row)) for row in rows]
    expected = pg.agreement(records, "truth", labels=["pos", "neu", "neg"], n_boot=200, item="doc",
                            coder="annotator", label="code")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(expected.to_dict()))
    path.write_text("doc,annotator,code,truth\nd1,ann,pos,pos\nd2,ann,neg,\n")
    r = cli("agreement", path, "--item-column", "doc", "--coder-column", "annotator", "--label-column", "code",
            "--gold-column", "truth")
    assert r.returncode == 2 and "gold has no label for 1 of 2 items" in r.stderr and "Traceback" not in r.stderr


# -- run records of generate and classify --------------------------------------------------------
def test_classify_and_generate_jobs_write_a_run_record_and_a_resume_appends_a_segment(smollm2_path, tmp_path):
    texts, _ = reviews()
    src, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    src.write_text("\n".join(texts[:6]) + "\n")
    opts = dict(model_options=dict(n_parallel=2, n_ctx=256, n_threads=1))
    s = pg.jobs.classify_file(str(smollm2_path), src, out, LABELS, template=TEMPLATES["plain"], **opts)
    assert s.written == 6
    rec = pg.RunRecord.read(str(out) + ".run.json")
    assert rec.kind == "classify" and rec.arguments["labels"] == LABELS
    assert rec.arguments["template"] == TEMPLATES["plain"] and rec.arguments["normalize"] == "sum"
    assert rec.input == {"path": str(src), "bytes": src.stat().st_size, "sha256": sha256(src)}
    m = rec.models[0]
    assert m["name"] == Path(smollm2_path).name and m["bytes"] == Path(smollm2_path).stat().st_size
    assert m["sha256"] == sha256(smollm2_path) and m["config"]["n_ctx"] == 256 and m["config"]["n_parallel"] == 2
    env = rec.environment
    assert env["parallel_gen"] == pg.__version__ and env["llama_cpp_python"] and env["cores"] == os.cpu_count()
    assert env["cpu"] and "system_info" in env["llama_cpp"] and isinstance(env["gpu_offload"], bool)
    assert rec.command and len(rec.segments) == 1 and rec.segments[0]["written"] == 6 and rec.failed == 0
    assert rec.output["sha256"] == sha256(out) and rec.rows == 6 and rec.verify()
    pg.jobs.classify_file(str(smollm2_path), src, out, LABELS, template=TEMPLATES["plain"], resume=True, **opts)
    rec = pg.RunRecord.read(out)
    assert [(g["rows_before"], g["written"]) for g in rec.segments] == [(0, 6), (6, 0)]
    assert all(g["started"] <= g["ended"] for g in rec.segments)
    src.write_text("\n".join(texts[1:7]) + "\n")  # same number of rows, other texts
    with pytest.raises(pg.jobs.JobInputError, match="changed since the job started"):
        pg.jobs.classify_file(str(smollm2_path), src, out, LABELS, template=TEMPLATES["plain"], resume=True, **opts)
    assert rec.verify() and len(pg.RunRecord.read(out).segments) == 2  # refused: nothing written, no segment
    out.write_text(out.read_text() + "\n")
    assert not rec.verify()  # the output changed after its record
    gen = tmp_path / "gen.jsonl"
    pg.run_file_job(str(smollm2_path), src, gen, max_tokens=3, temperature=0, **opts)
    rec = pg.RunRecord.read(gen)
    assert rec.kind == "generate" and rec.arguments["params"]["max_tokens"] == 3
    assert rec.arguments["params"]["temperature"] == 0 and rec.rows == 6 and rec.verify()
    assert not math.isnan(rec.segments[0]["written"])
