"""Batch jobs on Ray Data (parallel_gen.ray and `parallel-gen generate --ray`).

One real single-node cluster for the module (Ray's local_mode is gone): 4 logical CPUs,
so 2 actors x 1 CPU leave room for the read and write tasks; a small object store.
Outputs are compared with generate_parallel's greedy output on the same prompts
(greedy SmolLM2 output does not depend on the batch, the slot or n_ctx).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from conftest import import_extra

import_extra("ray.data", "ray")  # not installed: a skip, or a failure under PG_REQUIRE_EXTRAS=1 (make test)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

import parallel_gen as pg  # noqa: E402
from parallel_gen.jobs.records import OUTPUT_COLUMNS  # noqa: E402
from parallel_gen.ray import BatchGenerator, RayJobError, classify, generate, run_ray_job  # noqa: E402

PYTHON_DIR = str(Path(pg.__file__).resolve().parent.parent)
MAX_TOKENS = 6
# Both actors and the reference Model: one thread, the same n_ctx.
ACTOR_MODEL = dict(n_parallel=4, n_ctx=256)
ACTOR_PROCESS_TITLE = "MapBatches(BatchGenerator)"


@pytest.fixture(scope="module")
def cluster():
    if not ray.is_initialized():
        # Workers inherit this process's environment (PYTHONPATH included).
        ray.init(num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=8, n_ctx=256, n_threads=1) as m:
        yield m


def rows(n):
    return [{"id": i, "prompt": f"Fact {i}: the number {i * 7} is", "tag": f"t{i % 5}", "max_tokens": None}
            for i in range(n)]


def greedy(model, prompts, n=MAX_TOKENS):
    return pg.generate_parallel(model, prompts, max_tokens=n, temperature=0).texts


def by_id(records):
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(set(ids)), f"rows written twice: {sorted(i for i in ids if ids.count(i) > 1)}"
    return {r["id"]: r for r in records}


def run_generate(ds, smollm2_path, **kw):
    return generate(ds, smollm2_path, actors=2, cpus_per_actor=1, temperature=0, max_tokens=MAX_TOKENS,
                    model_options=ACTOR_MODEL, **kw)


# -- generate() -------------------------------------------------------------------------
def test_generate_matches_generate_parallel_carries_columns_and_isolates_bad_rows(cluster, smol, smollm2_path):
    data = rows(64)
    data[17]["prompt"] = None  # no prompt: this row's error, not the dataset's
    data[40]["max_tokens"] = 2  # a per-row SamplingParams column
    data[50]["prompt"] = "x " * 400  # longer than n_ctx
    out = run_generate(ray.data.from_items(data), smollm2_path, batch_size=8).take_all()

    got = by_id(out)
    assert sorted(got) == list(range(64))
    assert list(out[0]) == ["id", "prompt", "tag", "max_tokens", *OUTPUT_COLUMNS]
    good = [i for i in range(64) if i not in (17, 40, 50)]
    want = dict(zip(good, pg.generate_parallel(smol, [data[i]["prompt"] for i in good], max_tokens=MAX_TOKENS,
                                               temperature=0)))
    for i in good:
        r, c = got[i], want[i]
        assert (r["text"], r["finish_reason"], r["error"]) == (c.text, c.finish_reason, None), i
        assert (r["prompt_tokens"], r["completion_tokens"]) == (c.prompt_tokens, c.completion_tokens)
        assert (r["tag"], r["prompt"], r["row"]) == (data[i]["tag"], data[i]["prompt"], None)
    assert got[40]["text"] == greedy(smol, [data[40]["prompt"]], 2)[0] and got[40]["completion_tokens"] == 2
    assert got[17]["finish_reason"] == "error" and "'prompt' or 'messages'" in got[17]["error"]
    assert got[17]["text"] == "" and got[17]["tag"] == data[17]["tag"]
    assert got[50]["finish_reason"] == "error" and "n_ctx" in got[50]["error"]


def test_an_actor_killed_mid_job_is_restarted_and_every_row_written_once(cluster, smol, smollm2_path):
    data = rows(64)
    ds = run_generate(ray.data.from_items(data, override_num_blocks=16), smollm2_path, batch_size=4)
    received, killed = [], None
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        received.extend(batch.to_pylist())
        if killed is None:
            pids = actor_pids()
            assert pids, "no BatchGenerator actor process found"
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            rows_before_kill = len(received)
    assert killed is not None and rows_before_kill < 64, "the job ended before the kill"
    assert not Path(f"/proc/{killed}").exists() or killed not in actor_pids()
    got = by_id(received)
    assert sorted(got) == list(range(64))
    want = greedy(smol, [r["prompt"] for r in data])
    assert [got[i]["text"] for i in range(64)] == want
    assert all(got[i]["error"] is None for i in range(64))


def actor_pids():
    """Processes of this user whose title names the BatchGenerator actors."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if ACTOR_PROCESS_TITLE in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return sorted(pids)


def test_a_batch_whose_first_row_fails_has_the_jobs_columns_and_one_schema(smol, smollm2_path):
    """BatchGenerator, the actor's own code, on two batches: the first starts with a row
    that fails, the second with one that runs. Both get the job's columns (samples,
    logprobs) with the same Arrow types; the failed rows have them null."""
    params = pg.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, n=2, logprobs=1, seed=1)
    gen = BatchGenerator(str(smollm2_path), params=params, model_options=dict(ACTOR_MODEL, n_threads=1))
    first_fails = gen(pa.table({"id": [0, 1], "prompt": [None, "The capital of France is"]}))
    first_runs = gen(pa.table({"id": [2, 3], "prompt": ["Roses are red,", None]}))
    del gen
    assert first_fails.schema == first_runs.schema
    assert first_fails.schema.names[-3:] == ["samples", "logprobs", "cumulative_logprob"]
    assert first_fails.schema.field("logprobs").type == pa.list_(
        pa.struct([("token", pa.string()), ("logprob", pa.float64())]))
    got = {r["id"]: r for r in first_fails.to_pylist() + first_runs.to_pylist()}
    want = pg.generate_parallel(smol, ["The capital of France is", "Roses are red,"], max_tokens=MAX_TOKENS,
                                temperature=0, logprobs=1)
    for i, c in zip((1, 2), want):
        assert [x["text"] for x in got[i]["samples"]] == [c.text] * 2
        assert [x["token"] for x in got[i]["logprobs"]] == [t.token for t in c.outputs[0].logprobs]
        assert got[i]["cumulative_logprob"] == pytest.approx(c.outputs[0].cumulative_logprob, abs=1e-4)
    for i in (0, 3):
        assert got[i]["finish_reason"] == "error" and got[i]["logprobs"] is None
        assert got[i]["cumulative_logprob"] is None and len(got[i]["samples"]) == 2


def test_sampling_with_a_seed_is_the_same_on_any_batching(cluster, smollm2_path):
    data = rows(12)
    runs = [generate(ray.data.from_items(data), smollm2_path, actors=1, batch_size=size, temperature=0.9,
                     seed=7, max_tokens=MAX_TOKENS, model_options=ACTOR_MODEL).take_all() for size in (3, 12)]
    first, second = (by_id(r) for r in runs)
    assert {i: first[i]["text"] for i in first} == {i: second[i]["text"] for i in second}
    assert len({first[i]["text"] for i in first}) > 1


def test_a_messages_column_goes_through_the_chat_template(cluster, smol, smollm2_path):
    questions = ["What is 2 + 2?", "Name a colour.", "Say hello.", "What is the capital of Italy?"]
    data = [{"id": i, "messages": [{"role": "user", "content": q}]} for i, q in enumerate(questions)]
    data.append({"id": 4, "messages": [{"role": "user"}]})  # no content: its own error
    out = by_id(generate(ray.data.from_items(data), smollm2_path, actors=1,
                         max_tokens=MAX_TOKENS, temperature=0, model_options=ACTOR_MODEL).take_all())
    want = pg.chat_parallel(smol, [d["messages"] for d in data[:4]], max_tokens=MAX_TOKENS, temperature=0).texts
    assert [out[i]["text"] for i in range(4)] == want
    assert out[4]["finish_reason"] == "error" and "content" in out[4]["error"]


def test_bad_arguments_fail_at_the_call(cluster):
    ds = ray.data.from_items(rows(2))
    with pytest.raises(ValueError, match="actors=0"):
        generate(ds, actors=0)
    with pytest.raises(ValueError, match="batch_size=-1"):
        generate(ds, batch_size=-1)
    with pytest.raises(TypeError, match="unknown|unexpected"):
        generate(ds, temprature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(ds, temperature=-1)
    with pytest.raises(TypeError, match="ray.data.Dataset"):
        generate([{"prompt": "x"}])
    with pytest.raises(ValueError, match="prompt_column"):
        generate(ds, prompt_column="")
    with pytest.raises(ValueError, match="seed"):
        BatchGenerator(None, params=pg.SamplingParams())


# -- classify() -------------------------------------------------------------------------
LABELS = ["positive", "negative", "neutral"]
REVIEWS = ["I loved every minute of it.", "Cold food and rude staff.", "It opens at nine.",
           "Best purchase this year.", "Broke after a day.", "The package came on Tuesday."]


def test_classify_matches_pg_classify_carries_columns_and_isolates_bad_rows(cluster, smollm2_path):
    """Each actor: one thread, flash attention on, separate KV streams, so a text's
    probabilities do not depend on its batch (tests/test_scoring.py): equal to rounding."""
    options = dict(ACTOR_MODEL, flash_attn=True)
    data = [{"id": i, "text": REVIEWS[i % len(REVIEWS)] + f" ({i})", "label": "gold"} for i in range(24)]
    data[5]["text"] = None  # no text: this row's error, not the dataset's
    data[9]["text"] = "word " * 400  # longer than n_ctx
    out = by_id(classify(ray.data.from_items(data), LABELS, smollm2_path, actors=2, batch_size=5,
                         model_options=options).take_all())
    assert sorted(out) == list(range(24))
    assert list(out[0]) == ["id", "text", "input_label", "row", "label", "p_positive", "p_negative", "p_neutral",
                            "error", "error_code"]
    good = [i for i in range(24) if i not in (5, 9)]
    with pg.Model(smollm2_path, n_threads=1, **options) as m:
        want = pg.classify(m, [data[i]["text"] for i in good], LABELS)
    for i, exp in zip(good, want):
        row = out[i]
        assert row["error"] is None and row["row"] is None and row["input_label"] == "gold"
        assert [row["p_" + lab] for lab in LABELS] == pytest.approx([exp.probs[lab] for lab in LABELS], abs=1e-6)
        assert row["label"] == exp.label
    for i, why in ((5, "'text' is missing"), (9, "n_ctx")):
        assert out[i]["label"] is None and out[i]["p_positive"] is None and why in out[i]["error"], out[i]


def test_classify_bad_arguments_fail_at_the_call(cluster):
    ds = ray.data.from_items([{"text": "x"}])
    with pytest.raises(ValueError, match="duplicate"):
        classify(ds, ["a", "b", "a"])
    with pytest.raises(ValueError, match="no {text} field"):
        classify(ds, ["a", "b"], template="Label:")
    with pytest.raises(ValueError, match="actors=0"):
        classify(ds, ["a", "b"], actors=0)
    with pytest.raises(ValueError, match="text_column"):
        classify(ds, ["a", "b"], text_column="")
    with pytest.raises(TypeError, match="ray.data.Dataset"):
        classify([{"text": "x"}], ["a", "b"])


def test_a_missing_model_fails_the_job_with_its_path(cluster, tmp_path):
    missing = tmp_path / "nope.gguf"
    t0 = time.time()
    with pytest.raises(Exception, match="nope.gguf"):
        generate(ray.data.from_items(rows(2)), missing, model_options=ACTOR_MODEL).take_all()
    assert time.time() - t0 < 60


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_ray_job_writes_a_run_record_whose_seed_reproduces_it(cluster, smollm2_path, tmp_path):
    src, out, again = tmp_path / "in.jsonl", tmp_path / "out", tmp_path / "again"
    src.write_text("".join(json.dumps({"id": i, "prompt": f"Story {i}: once upon a time"}) + "\n" for i in range(8)))
    job = dict(model=str(smollm2_path), temperature=0.9, max_tokens=MAX_TOKENS, model_options=ACTOR_MODEL)
    summary = run_ray_job(cluster, str(src), str(out), actors=2, batch_size=3, **job)  # no seed: the job draws one
    record = pg.RunRecord.read(out)  # out.run.json, beside the output directory
    assert record.kind == "generate" and record.input["sha256"] == sha256(src) and record.input["bytes"] > 0
    [model] = record.models
    assert model["sha256"] == sha256(smollm2_path) and model["config"]["n_ctx"] == 256
    assert model["config"]["n_threads"] == 1  # an actor's: its one CPU
    seed = record.arguments["params"]["seed"]
    assert isinstance(seed, int) and record.arguments["params"]["temperature"] == 0.9
    assert record.arguments["actors"] == 2 and record.arguments["batch_size"] == 3
    assert record.output["rows"] == summary.rows == 8 and record.output["files"] == len(list(out.iterdir()))
    [segment] = record.segments
    assert segment["ended"] and segment["error"] is None and segment["written"] == 8 and record.verify()
    first = {i: r["text"] for i, r in by_id(read_dir(out)).items()}
    assert len(set(first.values())) > 1  # sampled
    # The recorded seed makes the same texts, on another batching.
    run_ray_job(cluster, str(src), str(again), actors=1, batch_size=8, seed=seed, **job)
    assert {i: r["text"] for i, r in by_id(read_dir(again)).items()} == first
    assert pg.RunRecord.read(again).arguments["params"]["seed"] == seed
    part = sorted(out.iterdir())[0]  # a changed output no longer verifies
    part.write_bytes(part.read_bytes() + b"\n")
    assert not record.verify()
    # A job that fails records why.
    failed = tmp_path / "failed"
    with pytest.raises(RayJobError, match="nope.gguf"):
        run_ray_job(cluster, str(src), str(failed), model=str(tmp_path / "nope.gguf"), model_options=ACTOR_MODEL)
    [segment] = pg.RunRecord.read(failed).segments
    assert segment["ended"] and "nope.gguf" in segment["error"]


def test_a_ray_job_answers_from_a_redis_result_cache_what_it_stored(cluster, smol, smollm2_path, tmp_path):
    from test_gateway import RedisServer

    redis = RedisServer()
    try:
        src = tmp_path / "in.jsonl"
        # Distinct from the first token, and no prompt cache: every prefill is whole (a row whose
        # prefill reused cached KV is not stored, see ResultCache).
        words = ["Apples", "Rivers", "Seven", "Quietly", "Under", "Maps"]
        data = [{"id": i, "prompt": f"{w} and the number {i * 7} are", "temperature": None, "seed": None}
                for i, w in enumerate(words)]
        data.append({"id": 6, "prompt": "Once upon a time", "temperature": 0.9, "seed": None})  # the job's drawn seed
        data.append({"id": 7, "prompt": "Later that day", "temperature": 0.9, "seed": 5})  # the row's own seed
        src.write_text("".join(json.dumps(d) + "\n" for d in data))
        job = dict(model=str(smollm2_path), temperature=0, max_tokens=MAX_TOKENS, cache=redis.url, actors=2,
                   batch_size=3, model_options={**ACTOR_MODEL, "prompt_cache": False})
        run_ray_job(cluster, str(src), str(tmp_path / "one"), **job)
        stored = redis.client.keys("parallel_gen:result:*")
        assert len(stored) == 7  # not row 6: a seed the job drew is no other run's
        hits = redis.client.info("stats")["keyspace_hits"]
        run_ray_job(cluster, str(src), str(tmp_path / "two"), **job)
        assert redis.client.info("stats")["keyspace_hits"] - hits == 7  # each cacheable row looked up and found
        assert sorted(redis.client.keys("parallel_gen:result:*")) == sorted(stored)  # nothing stored again
        one, two = by_id(read_dir(tmp_path / "one")), by_id(read_dir(tmp_path / "two"))
        assert [two[i]["text"] for i in range(8) if i != 6] == [one[i]["text"] for i in range(8) if i != 6]
        assert [one[i]["text"] for i in range(6)] == greedy(smol, [d["prompt"] for d in data[:6]])
        assert all(two[i]["completion_tokens"] == one[i]["completion_tokens"] for i in range(6))
        assert pg.RunRecord.read(tmp_path / "two").arguments["cache"] == redis.url
    finally:
        redis.kill()


# -- the command line -------------------------------------------------------------------
def cli(*args, timeout=240, command="generate"):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    return subprocess.run([sys.executable, "-m", "parallel_gen", command, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def read_dir(path):
    files = sorted(Path(path).iterdir())
    assert files, f"nothing written in {path}"
    if any(f.suffix == ".parquet" for f in files):
        return pa.concat_tables([pq.read_table(f) for f in files if f.suffix == ".parquet"],
                                promote_options="permissive").to_pylist()
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def test_cli_jsonl_in_parquet_out_on_a_local_cluster(smol, tmp_path):
    data = [{"id": i, "prompt": f"Fact {i}: the number {i * 7} is", "tag": f"t{i}"} for i in range(10)]
    data.append({"id": 10, "tag": "no prompt"})
    src = tmp_path / "in.jsonl"
    lines = [json.dumps(r) + "\n" for r in data]
    lines.insert(0, '{"id": 99, "prompt": \n')  # malformed: its own error row, the first of its batch
    src.write_text("".join(lines))
    out = tmp_path / "out.parquet"
    r = cli("--ray", "-f", src, "-o", out, "-n", MAX_TOKENS, "--temperature", 0, "--threads", 1,
            "--n-parallel", 4, "--stats", "--samples", 2, "--logprobs", 1)
    assert r.returncode == 1, r.stderr  # the row without a prompt and the malformed line failed
    assert "2 of 12 row(s) failed" in r.stderr and "12 rows (2 failed)" in r.stderr
    written = read_dir(out)
    [bad] = [w for w in written if w["id"] is None]
    assert "not valid JSON" in bad["error"] and '{"id": 99' in bad["error"] and bad["finish_reason"] == "error"
    assert "__parallel_gen_input_error" not in bad
    got = by_id([w for w in written if w["id"] is not None])
    assert sorted(got) == list(range(11))
    want = pg.generate_parallel(smol, [d["prompt"] for d in data[:10]], max_tokens=MAX_TOKENS, temperature=0,
                                logprobs=1)
    assert [got[i]["text"] for i in range(10)] == want.texts
    assert [got[i]["tag"] for i in range(11)] == [d["tag"] for d in data]
    assert got[10]["error"] and got[10]["finish_reason"] == "error"
    # The columns are the job's (--samples 2, --logprobs 1) in every row, though the
    # batch's first row failed: a failed row has them null.
    assert all(w["samples"] is not None and w["logprobs"] is not None for w in (got[i] for i in range(10)))
    assert bad["logprobs"] is None and bad["cumulative_logprob"] is None and len(bad["samples"]) == 2
    for i in range(10):
        assert [x["text"] for x in got[i]["samples"]] == [want[i].text] * 2
        assert [x["token"] for x in got[i]["logprobs"]] == [t.token for t in want[i].outputs[0].logprobs]
        assert [x["logprob"] for x in got[i]["logprobs"]] == pytest.approx(
            [t.logprob for t in want[i].outputs[0].logprobs], abs=1e-4)

    again = cli("--ray", "-f", src, "-o", out)  # an existing output is protected
    assert again.returncode == 2 and str(out) in again.stderr and "--overwrite" in again.stderr
    assert len(read_dir(out)) == 12


def test_cli_parquet_dir_in_jsonl_out_on_a_given_cluster(cluster, smol, tmp_path):
    src = tmp_path / "prompts"
    src.mkdir()
    for part in range(2):  # a directory of Parquet files
        pq.write_table(pa.Table.from_pylist([{"id": part * 6 + i, "prompt": f"Item {part * 6 + i}: the sky is"}
                                             for i in range(6)]), src / f"part-{part}.parquet")
    out = tmp_path / "out"
    r = cli("--ray", cluster, "-f", src, "-o", out, "--output-format", "jsonl", "-n", MAX_TOKENS,
            "--temperature", 0, "--threads", 1, "--ray-actors", 2, "--n-ctx", 256, "--batch-size", 3)
    assert r.returncode == 0, r.stderr
    got = by_id(read_dir(out))
    assert sorted(got) == list(range(12))
    want = greedy(smol, [f"Item {i}: the sky is" for i in range(12)])
    assert [got[i]["text"] for i in range(12)] == want


def test_cli_tools_on_a_given_cluster_call_as_the_file_job_does(cluster, smollm2_path, tmp_path):
    from test_tools import HERMES, SCHEMAS, TOOLS, user

    from parallel_gen import run_file_job

    rows = [{"id": 0, "prompt": "What is the weather in Paris?"}, {"id": 1, "messages": user("Time in Tokyo?")},
            {"id": 2, "messages": [{"role": "user"}]}]
    src, out, local = tmp_path / "in.jsonl", tmp_path / "out", tmp_path / "local.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    (tmp_path / "hermes.jinja").write_text(HERMES)
    r = cli("--ray", cluster, "-f", src, "-o", out, "--output-format", "jsonl", "--tools", tmp_path / "tools.json",
            "--tool-choice", "required", "--no-parallel-tool-calls", "--chat-template-file", tmp_path / "hermes.jinja",
            "-n", 80, "--temperature", 0, "--threads", 1, "--n-parallel", 4)  # n_ctx sized to the tools' prompts
    assert r.returncode == 1, r.stderr  # row 2's message has no content
    got = by_id(read_dir(out))
    run_file_job(smollm2_path, src, local, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                 chat_template=HERMES, temperature=0, max_tokens=80, model_options={"n_threads": 1, "n_parallel": 4})
    want = {r["id"]: r for r in map(json.loads, local.read_text().splitlines())}
    for i in (0, 1):
        assert got[i]["finish_reason"] == "tool_calls" and len(got[i]["tool_calls"]) == 1
        [call] = got[i]["tool_calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
        assert call["function"] == want[i]["tool_calls"][0]["function"]  # greedy: the file job's call
        assert got[i]["content"] == want[i]["content"]
    assert got[2]["finish_reason"] == "error" and got[2]["tool_calls"] == []
    # (Arrow gives every message of a block the same keys: the missing content reads as null)
    assert "messages[0]['content'] must be a str, got NoneType" in got[2]["error"]
    assert pg.RunRecord.read(out).arguments["tools"]["mode"] == "required"


def test_cli_classify_jsonl_in_parquet_out_on_a_given_cluster(cluster, smollm2_path, tmp_path):
    src, out = tmp_path / "reviews.jsonl", tmp_path / "labels"
    lines = [json.dumps({"id": i, "text": REVIEWS[i]}) for i in range(len(REVIEWS))] + ['{"id": 99, "text": ']
    src.write_text("\n".join(lines) + "\n")
    args = ["--ray", cluster, "-f", src, "-o", out, "--labels", ",".join(LABELS), "--threads", 1,
            "--n-parallel", 4, "--n-ctx", 256, "--flash-attn", "on", "--ray-actors", 2, "--batch-size", 2]
    r = cli(*args, "--stats", command="classify")
    assert r.returncode == 1, r.stderr  # the malformed line is a failed row
    assert f"1 of {len(REVIEWS) + 1} row(s) failed" in r.stderr and "parallel-gen classify" in r.stderr
    record = pg.RunRecord.read(out)
    assert record.kind == "classify" and record.arguments["labels"] == LABELS and record.input["sha256"] == sha256(src)
    assert record.output["rows"] == len(REVIEWS) + 1 and record.segments[0]["failed"] == 1 and record.verify()
    assert record.command[1:3] == ["classify", "--ray"]
    written = read_dir(out)
    [bad] = [w for w in written if w.get("id") is None]  # JSONL: a block's rows have only its columns
    assert "not valid JSON" in bad["error"] and bad["label"] is None
    got = by_id([w for w in written if w.get("id") is not None])
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=256, n_threads=1, flash_attn=True) as m:
        want = pg.classify(m, REVIEWS, LABELS)
    for i, exp in enumerate(want):
        assert [got[i]["p_" + lab] for lab in LABELS] == pytest.approx([exp.probs[lab] for lab in LABELS], abs=1e-6)
        assert got[i]["label"] == exp.label and got[i]["error"] is None
    # what a Ray job cannot do, before any cluster work
    r = cli("--ray", cluster, "-f", src, "-o", tmp_path / "o2", "--labels", "a,b", "--resume", command="classify")
    assert r.returncode == 2 and "--resume is not for --ray jobs" in r.stderr, r.stderr
    r = cli("--ray", "--labels", "a,b", "Great.", "-o", tmp_path / "o3", command="classify")
    assert r.returncode == 2 and "--ray needs --file" in r.stderr, r.stderr
    r = cli("--ray", cluster, "-f", src, "-o", tmp_path / "o4", "--labels", "a,a", command="classify")
    assert r.returncode == 2 and "duplicate" in r.stderr and not (tmp_path / "o4").exists(), r.stderr


def test_cli_a_model_no_actor_can_load_is_a_short_error(cluster, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hello"}\n')
    r = cli("--ray", cluster, "-f", src, "-o", tmp_path / "out", "-m", tmp_path / "missing.gguf")
    assert r.returncode == 1 and "the Ray job failed" in r.stderr and "missing.gguf" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_ray_rejects_what_it_cannot_do(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("prompt\nhello\n")
    for args, message in [(["--ray", "hello"], "--file"),
                          (["--ray", "-f", src, "-o", tmp_path / "o"], "Parquet or JSONL"),
                          (["--ray", "-f", tmp_path / "none.jsonl", "-o", tmp_path / "o"], "none.jsonl"),
                          (["--ray", "-f", src, "-o", tmp_path / "o", "--resume"], "--resume"),
                          (["--ray", "-f", src, "-o", tmp_path / "o", "--ray-actors", 0], "--ray-actors 0"),
                          (["--ray", "-f", src, "-o", tmp_path / "o", "--threads", 0], "--threads 0")]:
        r = cli(*args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
