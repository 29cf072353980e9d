"""Command line: ``parallel-gen <command>`` (also ``python -m parallel_gen``).

Commands: ``generate`` (prompts from arguments, a file of any size or stdin; JSONL, CSV,
Parquet or text out; resumable, see jobs/), ``classify`` (label probabilities of many
texts, the same inputs and outputs; jobs/classify.py),
``demo`` (a few chat questions on the default model) and ``info`` (model and build).
Exit status: 0 success; 1 model missing or unloadable, generation failed, or some
prompt finished with an error; 2 bad arguments or input; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

DEMO_QUESTIONS = [
    "Write a haiku about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for learning to code.",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that reverses a string.",
    "Is the sentiment of 'I loved this film!' positive or negative?",
]

# (SamplingParams field, flags, type, metavar, help). test_cli checks every field has one.
SAMPLING_FLAGS = [
    ("n", ("--samples",), int, "N", "completions per prompt (SamplingParams.n)"),
    ("max_tokens", ("-n", "--max-tokens"), int, "N", "most tokens to generate per prompt"),
    ("temperature", ("--temperature", "--temp"), float, "T", "sampling temperature; 0 is greedy"),
    ("top_k", ("--top-k",), int, "K", "keep the k most likely tokens (0: off)"),
    ("top_p", ("--top-p",), float, "P", "nucleus sampling threshold (1: off)"),
    ("min_p", ("--min-p",), float, "P", "drop tokens below min_p times the best one (0: off)"),
    ("repeat_penalty", ("--repeat-penalty",), float, "X", "penalty for repeated tokens (1: off)"),
    ("repeat_last_n", ("--repeat-last-n",), int, "N", "window of the penalties in tokens (-1: all)"),
    ("frequency_penalty", ("--frequency-penalty",), float, "X", "frequency penalty (0: off)"),
    ("presence_penalty", ("--presence-penalty",), float, "X", "presence penalty (0: off)"),
    ("seed", ("--seed",), int, "S", "RNG seed; prompt i uses seed + i (default: random)"),
    ("stop", ("--stop",), str, "TEXT", "stop string (repeatable)"),
    ("stop_token_ids", ("--stop-token-id",), int, "ID", "stop token id (repeatable)"),
    ("ignore_eos", ("--ignore-eos",), bool, None, "keep generating past end-of-generation tokens"),
    ("grammar", ("--grammar",), str, "GBNF", "GBNF grammar the output must follow (text, or @FILE)"),
    ("json_schema", ("--json-schema",), str, "SCHEMA", "JSON schema the output must match (text, or @FILE)"),
    ("choices", ("--choice",), str, "TEXT", "the output is exactly one of these (repeatable)"),
    ("logprobs", ("--logprobs",), int, "K", "report log-probabilities with the top K alternatives (0-20)"),
    ("logit_bias", ("--logit-bias",), str, "ID=BIAS", "add BIAS to token ID's logit (repeatable; -inf bans)"),
    ("grammar_triggers", ("--grammar-trigger",), str, "REGEX",
     "the grammar applies only from a match of REGEX on (repeatable)"),
]
_REPEATABLE = {"stop", "stop_token_ids", "choices", "logit_bias", "grammar_triggers"}


def _text_or_file(value: str) -> str:
    """'@path' reads the file: grammars and schemas are awkward as shell arguments."""
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    return value


def _read_arg_file(flag: str, path: str) -> str:
    from .cli_io import InputError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{flag} {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None


def _logit_bias(items: List[str]) -> dict:
    out = {}
    for item in items:
        tok, sep, bias = item.partition("=")
        try:
            out[int(tok)] = float(bias)
        except ValueError:
            raise ValueError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS, e.g. 42=-inf") from None
        if not sep:
            raise ValueError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS, e.g. 42=-inf")
    return out


# -- shared options ---------------------------------------------------------------------
def _add_model_options(p: argparse.ArgumentParser, n_parallel_help: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="GGUF", help="GGUF file (default: the packaged SmolLM2-135M-Instruct)")
    g.add_argument("--n-parallel", type=int, metavar="N", help=n_parallel_help)
    g.add_argument("--n-ctx", type=int, metavar="N",
                   help="tokens per sequence, prompt + output (default for generate and classify: sized to the "
                        "prompts and --max-tokens or the labels; else min(training, 4096), capped to half the "
                        "free memory)")
    g.add_argument("--n-batch", type=int, metavar="N", help="most tokens per decode call (default: 512)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: every core this process may use)")
    g.add_argument("--n-gpu-layers", type=int, metavar="N",
                   help="layers offloaded to a GPU (-1: all; needs a GPU build)")
    g.add_argument("--kv-unified", action="store_true", default=None, help="one KV buffer shared by all sequences")
    g.add_argument("--kv-size", type=int, metavar="N", help="cells of the shared KV pool (with --kv-unified)")
    g.add_argument("--flash-attn", choices=["auto", "on", "off"], help="flash attention (default: auto)")
    g.add_argument("--type-k", metavar="TYPE", help="KV cache type of K (default: f16)")
    g.add_argument("--type-v", metavar="TYPE", help="KV cache type of V (default: f16)")
    g.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log and parallel_gen's info log")


def _model_kwargs(args: argparse.Namespace, n_prompts: int) -> Dict[str, Any]:
    """Model(...) keywords for the options given; the rest keep Model's defaults."""
    names = {"n_ctx": "n_ctx", "n_batch": "n_batch", "threads": "n_threads", "n_gpu_layers": "n_gpu_layers",
             "kv_unified": "kv_unified", "kv_size": "kv_size", "type_k": "type_k", "type_v": "type_v"}
    kw = {model_kw: getattr(args, opt) for opt, model_kw in names.items() if getattr(args, opt) is not None}
    if args.flash_attn is not None:
        kw["flash_attn"] = {"auto": None, "on": True, "off": False}[args.flash_attn]
    # No more slots than prompts: each slot reserves a KV stream of n_ctx tokens.
    kw["n_parallel"] = args.n_parallel if args.n_parallel is not None else max(1, min(8, n_prompts))
    kw["verbose"] = bool(args.verbose)
    return kw


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    from .params import SamplingParams

    defaults = SamplingParams()
    g = p.add_argument_group("sampling (defaults: SamplingParams)")
    for field, flags, typ, metavar, text in SAMPLING_FLAGS:
        if typ is bool:
            g.add_argument(*flags, dest=field, action="store_true", default=None, help=text)
        elif field in _REPEATABLE:
            g.add_argument(*flags, dest=field, type=typ, metavar=metavar, action="append", help=text)
        else:
            default = getattr(defaults, field)
            g.add_argument(*flags, dest=field, type=typ, metavar=metavar,
                           help=f"{text} (default: {default})" if default is not None else text)


def _sampling_params(args: argparse.Namespace) -> "Any":
    from .params import SamplingParams

    given = {f: getattr(args, f) for f, *_ in SAMPLING_FLAGS if getattr(args, f) is not None}
    for f in ("grammar", "json_schema"):
        if f in given:
            given[f] = _text_or_file(given[f])
    if "logit_bias" in given:
        given["logit_bias"] = _logit_bias(given["logit_bias"])
    return SamplingParams(**given)


def _add_job_input_options(p: argparse.ArgumentParser, noun: str, metavar: str, json_field: str) -> None:
    """Where a file job's prompts (texts) come from: arguments, --file or stdin."""
    p.add_argument("prompts", nargs="*", metavar=metavar, help=f"{noun} (each one argument); '-' reads stdin")
    p.add_argument("-f", "--file", metavar="FILE", help=f"read {noun} from FILE ('-' for stdin)")
    p.add_argument("--input-format", choices=["auto", "text", "jsonl", "csv", "parquet"], default="auto",
                   help="format of --file/stdin (default: by extension; else JSONL when the first non-blank "
                        f"line is a JSON object with {json_field}, else text, one {noun[:-1]} per line)")


def _add_job_output_options(p: argparse.ArgumentParser, formats: List[str], format_help: str) -> None:
    """Where a file job's rows go, what happens to an existing output, and its statistics."""
    p.add_argument("-o", "--output", metavar="FILE", help="write the rows to FILE instead of stdout")
    p.add_argument("--output-format", "--format", dest="output_format", choices=formats, default="auto",
                   help=format_help)
    w = p.add_mutually_exclusive_group()
    w.add_argument("--resume", action="store_true",
                   help="continue the job that wrote --output: skip its rows, redo a torn last row")
    w.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--lookahead", type=int, metavar="N",
                   help="most rows in flight, read but not written yet (default: 4 per slot)")
    p.add_argument("--stats", action="store_true", help="print the job's statistics to stderr")


def _add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal and tqdm is installed)")


# -- generate ---------------------------------------------------------------------------
def _job_source(args: argparse.Namespace, columns: "Any", noun: str = "prompts") -> "Any":
    """Prompts (texts) from the arguments, or the --file / '-' / stdin source (opened lazily)."""
    from .cli_io import InputError, argument_source
    from .jobs.sources import open_source

    prompts = list(args.prompts)
    path = args.file
    if prompts == ["-"]:  # '-' as the only positional: stdin, like --file -
        prompts, path = [], path or "-"
    if prompts and path is not None:
        raise InputError(f"give {noun} as arguments or with --file / stdin, not both")
    if prompts:
        return argument_source(prompts, columns)
    if path is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError(f"no {noun}: give them as arguments, with --file FILE, or on stdin")
        path = "-"
    return open_source(path, args.input_format, columns)


def _add_chat_template_options(p: argparse.ArgumentParser) -> None:
    t = p.add_mutually_exclusive_group()
    t.add_argument("--chat-template", metavar="TEMPLATE",
                   help="Jinja template text or a llama.cpp built-in name such as chatml (default: the model's; "
                        "implies --chat)")
    t.add_argument("--chat-template-file", metavar="FILE",
                   help="read the Jinja chat template from a file (implies --chat)")


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("Ray (pip install 'parallel_gen[ray]')")
    r.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the job on a Ray cluster (auto, ray://HOST:PORT; none: a local one): -f and -o are "
                        "Parquet or JSONL files or directories every node can read; -o is written as a directory")
    r.add_argument("--ray-actors", type=int, default=1, metavar="N",
                   help="Ray actors, one Model each, with --threads CPUs each (default: 1)")
    r.add_argument("--batch-size", type=int, metavar="N", help="rows per Ray batch (default: 4 per slot)")


def _chat_template_arg(args: argparse.Namespace) -> Optional[str]:
    if args.chat_template_file is None:
        return args.chat_template
    return _read_arg_file("--chat-template-file", args.chat_template_file)


def _generate(args: argparse.Namespace) -> int:
    from .jobs.job import run_source_job
    from .jobs.sources import Columns

    tools = _tools_args(args)
    if args.ray is not None:
        if tools:
            from .cli_io import InputError

            raise InputError("--tools is not supported with --ray yet: run the job without --ray")
        from .ray.cli import generate_on_ray

        return generate_on_ray(args, _sampling_params, _model_kwargs, _chat_template_arg)
    params = _sampling_params(args)
    template_arg = _chat_template_arg(args)
    source = _job_source(args, Columns(args.prompt_column, args.messages_column))
    return _run_job(args, source, lambda model_options: run_source_job(
        args.model, source, args.output, output_format=args.output_format, resume=args.resume,
        overwrite=args.overwrite, chat=args.chat, system=args.system, chat_template=template_arg,
        progress=args.progress, params=params, lookahead=args.lookahead, model_options=model_options, **tools))


def _tools_args(args: argparse.Namespace) -> Dict[str, Any]:
    """run_source_job's tools keywords from --tools FILE, --tool-choice and
    --no-parallel-tool-calls (checked here: bad tools fail before the model loads)."""
    from .cli_io import InputError
    from .tools import tool_request

    if args.tools is None:
        if args.tool_choice is not None or not args.parallel_tool_calls:
            raise InputError("--tool-choice and --no-parallel-tool-calls need --tools FILE")
        return {}
    try:
        tools = json.loads(_read_arg_file("--tools", args.tools))
    except ValueError as e:
        raise InputError(f"--tools {args.tools}: not valid JSON ({e})") from None
    choice: Any = args.tool_choice
    if choice is not None and choice not in ("none", "auto", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    try:
        tool_request(tools, choice, args.parallel_tool_calls)
    except (TypeError, ValueError) as e:
        raise InputError(f"--tools {args.tools}: {e}") from None
    return dict(tools=tools, tool_choice=choice, parallel_tool_calls=args.parallel_tool_calls)


def _run_job(args: argparse.Namespace, source: "Any", run: "Callable[[Dict[str, Any]], Any]") -> int:
    """Runs a file job (``run(model_options)`` returns its JobSummary) and turns how it
    ended into messages and the exit status; closes ``source``."""
    from .cli_io import print_summary, resume_command
    from .errors import GenerationError
    from .jobs.job import JobInterrupted

    command = f"parallel-gen {args.command}"
    try:
        n_rows = source.total if source.total is not None else 8
        try:
            summary = run(_model_kwargs(args, n_rows))
        except JobInterrupted as e:
            s = e.summary
            where = f"in {s.output}" if s.output else "on stdout"
            print(f"{command}: interrupted: {s.rows} rows are {where}", file=sys.stderr)
            if s.output:
                print(f"continue with: {resume_command(args.argv)}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except GenerationError as e:  # the rows finished before the failure are in the output
            print(f"{command}: error: {e}", file=sys.stderr)
            if args.output not in (None, "-"):
                print(f"the rows written are kept; continue with: {resume_command(args.argv)}", file=sys.stderr)
            return EXIT_FAILED
    finally:
        source.close()
    if args.stats:
        print_summary(summary, sys.stderr)
    if summary.failed:
        print(f"{command}: {summary.failed} of {summary.written} row(s) failed "
              "(see their \"error\")", file=sys.stderr)
        return EXIT_FAILED
    return 0


# -- classify ---------------------------------------------------------------------------
def _labels_arg(args: argparse.Namespace) -> "Tuple[str, str, List[str]]":
    """(flag, value, labels) of --labels A,B,C (spaces around each trimmed) or --labels-file
    (one label per line, blank lines skipped)."""
    if args.labels_file is not None:
        lines = _read_arg_file("--labels-file", args.labels_file).splitlines()
        return "--labels-file", args.labels_file, [line for line in lines if line != ""]
    return "--labels", args.labels, [lab.strip() for lab in args.labels.split(",")]


def _classify(args: argparse.Namespace) -> int:
    from .classify import classify_options
    from .cli_io import InputError
    from .jobs.classify import classify_job, text_columns
    from .jobs.job import run_rows

    flag, value, labels = _labels_arg(args)
    try:
        classify_options(labels)
    except (TypeError, ValueError) as e:
        raise InputError(f"{flag} {value!r}: {e}") from None
    template = args.template
    if args.template_file is not None:
        template = _read_arg_file("--template-file", args.template_file)
    options = dict(template=template, chat=args.chat, system=args.system, normalize=args.normalize,
                   chat_template=_chat_template_arg(args))
    try:
        job = classify_job(labels, **options)
    except (TypeError, ValueError) as e:  # the labels are fine: the template is not
        which = "--template-file" if args.template_file is not None else "--template"
        raise InputError(f"{which}: {e}") from None
    if args.ray is not None:
        from .ray.cli import classify_on_ray

        return classify_on_ray(args, labels, options, _model_kwargs)
    source = _job_source(args, text_columns(args.text_column), "texts")
    return _run_job(args, source, lambda model_options: run_rows(
        args.model, source, args.output, job, output_format=args.output_format, resume=args.resume,
        overwrite=args.overwrite, progress=args.progress, lookahead=args.lookahead, model_options=model_options))


def _print_stats(s: Any, out: Any) -> None:
    print(f"{s.prompts} prompts, {s.prompt_tokens} prompt + {s.completion_tokens} generated tokens in "
          f"{s.wall_seconds:.2f} s: {s.prompt_tokens_per_second:.0f} prompt tok/s, "
          f"{s.generation_tokens_per_second:.0f} generation tok/s, {s.decode_calls} batched decode calls",
          file=out)


# -- demo -------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from .chat import chat_parallel
    from .generate import generate_parallel
    from .model import Model
    from .models import default_model_path

    path = args.model or default_model_path()
    n_parallel = args.n_parallel or len(DEMO_QUESTIONS)
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    with Model(path, n_parallel=n_parallel, n_ctx=512, n_batch=max(512, n_parallel), n_threads=args.threads,
               verbose=args.verbose) as model:
        print(f"{model.description} ({path}), {n_parallel} sequences in one batch\n")
        if model.chat_template() is not None:
            conversations = [[{"role": "user", "content": q}] for q in DEMO_QUESTIONS]
            results = chat_parallel(model, conversations, progress=args.progress, **sampling)
        else:  # a base model (Gemma 3 270M, the second choice): plain question/answer prompts
            prompts = [f"Question: {q}\nAnswer:" for q in DEMO_QUESTIONS]
            results = generate_parallel(model, prompts, stop=["\nQuestion:"], **sampling)
    for c, q in zip(results, DEMO_QUESTIONS):
        print(f"--- [{c.index}] {q}\n{c.text.strip()}\n    ({c.completion_tokens} tokens, {c.finish_reason})")
    print()
    _print_stats(results.stats, sys.stdout)
    return 0


# -- info -------------------------------------------------------------------------------
def _info_data(model_path: Optional[str]) -> Dict[str, Any]:
    import llama_cpp

    import parallel_gen

    from ._native import _core
    from .model import Model, _cpu_threads
    from .models import default_model_path

    data: Dict[str, Any] = {
        "build": {
            "parallel_gen": parallel_gen.__version__,
            "llama_cpp_python": llama_cpp.__version__,
            "libllama": _core.libllama_path(),
            "backends": list(_core.backends()),
            "gpu_offload": bool(_core.supports_gpu_offload()),
            "system_info": _core.system_info().strip(),
            "threads": _cpu_threads(),
        }
    }
    try:
        path = model_path or str(default_model_path())
        with Model(path, n_parallel=1, n_ctx=64) as m:
            meta = m.metadata()
            arch = meta.get("general.architecture", "")
            template = m.chat_template()
            data["model"] = {
                "path": str(path),
                "name": meta.get("general.name", ""),
                "description": m.description,
                "architecture": arch,
                "parameters": int(m._model.n_params),
                "size_bytes": int(m._model.size_bytes),
                "layers": int(m._model.n_layer),
                "context_length": int(m.n_ctx_train),
                "vocabulary": int(m.n_vocab),
                "chat_template": template is not None,
                **_kv_info(m),
            }
    except (OSError, ValueError) as e:  # missing or unloadable (ModelLoadError is a ValueError)
        data["model"] = {"error": _os_error_text(e)}
    return data


def _kv_info(m: Any) -> Dict[str, Any]:
    """KV cache figures: per token, and what a default Model (8 slots) allocates here."""
    from .memory import available_memory, capped_default_n_ctx, kv_cell_bytes, kv_cells
    from .model import _DEFAULT_N_CTX

    per_token = kv_cell_bytes(m.metadata(), "f16", "f16")
    streams = 8 + 1  # the default n_parallel, plus the shared-prefix stream
    n_ctx = capped_default_n_ctx(max(8, min(m.n_ctx_train, _DEFAULT_N_CTX)), per_token, streams, available_memory())
    return {"kv_bytes_per_token": per_token, "kv_bytes_allocated": m.kv_bytes, "default_n_ctx": n_ctx,
            "default_kv_bytes": kv_cells(n_ctx, streams, False, None, 8) * per_token}


def _info(args: argparse.Namespace) -> int:
    data = _info_data(args.model)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        b = data["build"]
        print(f"parallel_gen {b['parallel_gen']} on llama-cpp-python {b['llama_cpp_python']}")
        print(f"  libllama:    {b['libllama']}")
        print(f"  backends:    {', '.join(b['backends'])} (GPU offload: {'yes' if b['gpu_offload'] else 'no'})")
        print(f"  system:      {b['system_info']}")
        print(f"  threads:     {b['threads']} (default n_threads)")
        m = data["model"]
        if "error" in m:
            print(f"model: not available: {m['error']}")
        else:
            print(f"model: {m['path']}")
            print(f"  name:           {m['name']} ({m['description']})")
            print(f"  architecture:   {m['architecture']}")
            print(f"  parameters:     {m['parameters'] / 1e6:.1f} M ({m['size_bytes'] / 2**20:.0f} MiB on disk)")
            print(f"  layers:         {m['layers']}")
            print(f"  context length: {m['context_length']} tokens (training)")
            print(f"  vocabulary:     {m['vocabulary']} tokens")
            print(f"  chat template:  {'yes' if m['chat_template'] else 'no (a base model: use plain prompts)'}")
            print(f"  KV cache:       {m['kv_bytes_per_token'] / 1024:.1f} KiB per token (f16); a default Model "
                  f"(8 slots of n_ctx {m['default_n_ctx']}) allocates {m['default_kv_bytes'] / 2**20:.0f} MiB")
    if "error" in data["model"]:
        print(f"parallel-gen info: error: {data['model']['error']}", file=sys.stderr)
        return EXIT_FAILED
    return 0


# -- parser and entry point -------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``parallel-gen`` with all its subcommands."""
    p = argparse.ArgumentParser(prog="parallel-gen", description="Batched text generation with llama.cpp",
                                epilog="exit status: 0 ok; 1 model or generation failure, or a prompt failed; "
                                       "2 bad arguments or input; 130 interrupted")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate completions for many prompts (a file of any size)",
                       description="Generate a completion for every prompt, decoded together in one batch, "
                                   "streamed: rows are read lazily and each output row is written (in input "
                                   "order) as soon as it is done, so a killed job resumes with --resume. "
                                   "Prompts come from the arguments, --file / '-' (text, JSONL, CSV or Parquet), "
                                   "or stdin.")
    _add_job_input_options(g, "prompts", "PROMPT", "the prompt or messages field")
    g.add_argument("--prompt-column", metavar="NAME", default="prompt",
                   help="the input field holding the prompt (default: prompt)")
    g.add_argument("--messages-column", metavar="NAME", default="messages",
                   help="the input field holding a conversation, a list of {role, content} (default: messages)")
    g.add_argument("--chat", action="store_true",
                   help="send each plain prompt as a user message through the model's chat template")
    g.add_argument("--system", metavar="TEXT", help="system message for every plain prompt (implies --chat)")
    _add_chat_template_options(g)
    t = g.add_argument_group("tools (imply --chat)")
    t.add_argument("--tools", metavar="FILE",
                   help="JSON file: a list of OpenAI-style tools ({\"type\": \"function\", \"function\": {name, "
                        "description, parameters}}) offered in every conversation; rows get content and tool_calls")
    t.add_argument("--tool-choice", metavar="CHOICE", default=None,
                   help="auto (default), required, none, or a tool's name (a call of that tool)")
    t.add_argument("--no-parallel-tool-calls", dest="parallel_tool_calls", action="store_false",
                   help="at most one call per reply")
    _add_job_output_options(g, ["auto", "jsonl", "csv", "parquet", "text"],
                            "output rows: the input's fields + row, text, finish_reason, stop_reason, "
                            "prompt_tokens, completion_tokens, error (+ content, tool_calls with --tools) "
                            "(jsonl, csv, parquet), or the texts alone (text) (default: by the extension of "
                            "--output, else jsonl)")
    _add_ray_options(g)
    _add_progress_option(g)
    _add_sampling_options(g)
    _add_model_options(g, "sequences decoded together (default: min(8, number of rows when known))")
    g.set_defaults(func=_generate)

    c = sub.add_parser("classify", help="label probabilities for many texts (a file of any size)",
                       description="Classify every text over the labels with exact probabilities (no sampling; "
                                   "see parallel_gen.classify): each label is scored as the continuation of the "
                                   "text's prompt. Streamed and resumable like generate: texts come from the "
                                   "arguments, --file / '-' (text, JSONL, CSV or Parquet) or stdin, and each "
                                   "output row is written in input order as soon as it is done.",
                       epilog="output row: the input's fields, then row, label (the most likely), p_LABEL for "
                              "each label in the order given (the probabilities, summing to 1) and error; an "
                              "input field named like one of these is kept as input_NAME. A text that cannot "
                              "be classified (say, too long for --n-ctx) gets error set and null label and "
                              "probabilities, and the exit status is 1.")
    _add_job_input_options(c, "texts", "TEXT", "the --text-column field")
    c.add_argument("--text-column", metavar="NAME", default="text",
                   help="the input field holding the text (default: text)")
    lab = c.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labels", metavar="A,B,...",
                     help="the labels, comma separated (spaces around each are dropped)")
    lab.add_argument("--labels-file", metavar="FILE", help="the labels, one per line (for labels with commas)")
    tpl = c.add_mutually_exclusive_group()
    tpl.add_argument("--template", metavar="T",
                     help="the prompt: {text} is the text, {labels} the labels joined by ', ' (default: one that "
                          "names the labels and ends with 'Label: '; with --chat, the user's message)")
    tpl.add_argument("--template-file", metavar="FILE", help="read --template from FILE")
    c.add_argument("--chat", action="store_true",
                   help="put the prompt in a user turn through the model's chat template and score each label "
                        "as the assistant's whole answer")
    c.add_argument("--system", metavar="TEXT", help="system message (implies --chat)")
    _add_chat_template_options(c)
    c.add_argument("--normalize", choices=["sum", "mean"], default="sum",
                   help="softmax over the labels' total log-likelihoods (sum) or per-token means (mean) "
                        "(default: sum)")
    _add_job_output_options(c, ["auto", "jsonl", "csv", "parquet"],
                            "output rows (default: by the extension of --output, else jsonl)")
    _add_ray_options(c)
    _add_progress_option(c)
    _add_model_options(c, "sequences decoded together (default: min(8, number of rows when known))")
    c.set_defaults(func=_classify)

    d = sub.add_parser("demo", help="answer a few questions on the default model, in one batch")
    d.add_argument("-m", "--model", help="GGUF chat model (default: the packaged SmolLM2-135M-Instruct)")
    d.add_argument("-n", "--max-tokens", type=int, default=96, help="most tokens per answer (default: 96)")
    d.add_argument("--temperature", type=float, default=0.2, help="(default: 0.2)")
    d.add_argument("--seed", type=int, default=0, help="(default: 0)")
    d.add_argument("--n-parallel", type=int, metavar="N", help="sequences decoded together (default: all questions)")
    d.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: every core this process may use)")
    d.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    _add_progress_option(d)
    d.set_defaults(func=_demo)

    i = sub.add_parser("info", help="show the model's metadata and how llama.cpp was built")
    i.add_argument("-m", "--model", help="GGUF file (default: the packaged default model)")
    i.add_argument("--json", action="store_true", help="print the information as JSON")
    i.set_defaults(func=_info)

    from .bench import add_parser as _add_bench

    _add_bench(sub)
    from .server.cli import add_parser as _add_serve  # imports no server package until `serve` runs

    _add_serve(sub, _add_model_options)
    return p


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at the time of each record, so a
    swapped stderr (pytest capture, a redirecting caller) is honoured, never a stale one."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    """Shows parallel_gen's warnings (and info with --verbose) on stderr, once per process."""
    log = logging.getLogger("parallel_gen")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("parallel-gen: %(levelname)s: %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command line; returns the exit status."""
    from .errors import GenerationError, ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print the command that resumes a job
    _setup_logging(bool(getattr(args, "verbose", False)))

    def fail(code: int, message: str) -> int:
        print(f"parallel-gen {args.command}: error: {message}", file=sys.stderr)
        return code

    try:
        return int(args.func(args))
    except (FileNotFoundError, ModelLoadError) as e:  # a missing model says how to get it
        return fail(EXIT_FAILED, _os_error_text(e))
    except GenerationError as e:
        return fail(EXIT_FAILED, str(e))
    except ImportError as e:  # --progress without tqdm
        return fail(EXIT_FAILED, str(e))
    except (ValueError, TypeError) as e:  # bad option values or input (InputError included)
        return fail(EXIT_USAGE, str(e))
    except KeyboardInterrupt:
        return fail(EXIT_INTERRUPTED, "interrupted")
    except BrokenPipeError:  # `parallel-gen generate ... | head`: the reader left, not an error
        # Point stdout at /dev/null so the flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _os_error_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e)
