"""Command line: ``parallel-gen <command>`` (also ``python -m parallel_gen``).

Commands: ``generate`` (prompts from arguments, a file or stdin; JSONL or text out),
``demo`` (a few chat questions on the default model) and ``info`` (model and build).
Exit status: 0 success; 1 model missing or unloadable, generation failed, or some
prompt finished with an error; 2 bad arguments or input; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

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
]
_REPEATABLE = {"stop", "stop_token_ids", "choices", "logit_bias"}


def _text_or_file(value: str) -> str:
    """'@path' reads the file: grammars and schemas are awkward as shell arguments."""
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    return value


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
                   help="tokens per sequence, prompt + output (default: min(training, 4096))")
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


def _add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal and tqdm is installed)")


# -- generate ---------------------------------------------------------------------------
def _read_items(args: argparse.Namespace) -> "List[Any]":
    from .cli_io import InputError, Item, input_format, read_jsonl, read_text

    items = [Item(prompt=p) for p in args.prompts]
    source = args.file
    if source is None and not args.prompts:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("no prompts: give them as arguments, with --file FILE, or on stdin")
        source = "-"
    if source is not None:
        name = "<stdin>" if source == "-" else source
        fmt = input_format(name, args.input_format)
        reader = read_jsonl if fmt == "jsonl" else read_text
        if source == "-":
            items += reader(sys.stdin, name)
        else:
            try:
                with open(source, encoding="utf-8") as f:
                    items += reader(f, name)
            except OSError as e:
                raise InputError(f"cannot read {source}: {e.strerror}") from None
            except UnicodeDecodeError as e:
                raise InputError(f"{source} is not UTF-8 text: {e.reason}") from None
        if len(items) == len(args.prompts):
            raise InputError(f"no prompts in {name}")
    return items


def _chat_template_arg(args: argparse.Namespace) -> Optional[str]:
    if args.chat_template_file is None:
        return args.chat_template
    from .cli_io import InputError

    try:
        with open(args.chat_template_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"cannot read {args.chat_template_file}: {e.strerror}") from None


def _to_chat(args: argparse.Namespace, items: "List[Any]") -> None:
    """Turns plain prompts into conversations under --chat; checks every conversation."""
    from .chat import _message
    from .cli_io import InputError

    # A system message or a template only makes sense in a chat: either implies --chat.
    chat = args.chat or any(v is not None for v in (args.system, args.chat_template, args.chat_template_file))
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    for i, item in enumerate(items):
        if item.prompt is not None and chat:
            item.messages = system + [{"role": "user", "content": item.prompt}]
        if item.messages is not None:
            if not item.messages:
                raise InputError(f"input {i}: \"messages\" is empty")
            item.messages = [_message(f"input {i} message {j}", m) for j, m in enumerate(item.messages)]


def _open_output(path: Optional[str]) -> Any:
    """stdout, or the --output file, opened before any work so a bad path fails first."""
    if path is None:
        return contextlib.nullcontext(sys.stdout)
    from .cli_io import InputError

    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror}") from None


def _generate(args: argparse.Namespace) -> int:
    from .cli_io import InputError, write_jsonl, write_text
    from .generate import _param_list, run_batch
    from .model import Model
    from .models import default_model_path
    from .progress import make_progress
    from .templates import ChatTemplate

    params = _sampling_params(args)
    items = _read_items(args)
    _to_chat(args, items)
    template_arg = _chat_template_arg(args)
    # Seeds resolved once for the whole call: input i gets seed + i, as in generate_parallel.
    param_list = _param_list(params, {}, len(items))
    bar = make_progress(args.progress, len(items))
    with _open_output(args.output) as out:
        with Model(args.model or default_model_path(), **_model_kwargs(args, len(items))) as model:
            needs_template = any(item.messages is not None for item in items)
            template = ChatTemplate(model, template_arg) if needs_template else None
            prompts: List[str] = []
            for i, item in enumerate(items):
                if template is None or item.messages is None:
                    prompts.append(item.prompt or "")
                    continue
                try:
                    prompts.append(template.render(item.messages))
                except ValueError as e:
                    raise InputError(f"input {i}: {e}") from None
                param_list[i] = template.add_stops(param_list[i])
            with bar as on_step:
                result = run_batch(model, prompts, param_list, on_step=on_step)
        if args.format == "jsonl":
            write_jsonl(result, items, out)
        else:
            write_text(result, out)
    if args.stats:
        _print_stats(result.stats, sys.stderr)
    if result.stats.failed:
        print(f"parallel-gen generate: {result.stats.failed} of {len(items)} prompt(s) failed "
              "(see their \"error\")", file=sys.stderr)
        return EXIT_FAILED
    return 0


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
            }
    except (OSError, ValueError) as e:  # missing or unloadable (ModelLoadError is a ValueError)
        data["model"] = {"error": _os_error_text(e)}
    return data


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

    g = sub.add_parser("generate", help="generate completions for many prompts in one batch",
                       description="Generate a completion for every prompt, decoded together in one batch. "
                                   "Prompts come from the arguments, --file (one per line, or JSONL with "
                                   '{"prompt": ...} or {"messages": [...]} per line), or stdin.')
    g.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (each one argument)")
    g.add_argument("-f", "--file", metavar="FILE", help="read prompts from FILE ('-' for stdin)")
    g.add_argument("--input-format", choices=["auto", "text", "jsonl"], default="auto",
                   help="format of --file/stdin: text (one prompt per line) or jsonl "
                        "(default: jsonl for *.jsonl and *.ndjson, else text)")
    g.add_argument("--chat", action="store_true",
                   help="send each plain prompt as a user message through the model's chat template")
    g.add_argument("--system", metavar="TEXT", help="system message for every plain prompt (implies --chat)")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--chat-template", metavar="TEMPLATE",
                   help="Jinja template text or a llama.cpp built-in name such as chatml (default: the model's; "
                        "implies --chat)")
    t.add_argument("--chat-template-file", metavar="FILE",
                   help="read the Jinja chat template from a file (implies --chat)")
    g.add_argument("--format", choices=["jsonl", "text"], default="jsonl",
                   help="output: one JSON object per prompt (index, prompt, text, finish_reason, tokens, ...), "
                        "or the texts alone (default: jsonl)")
    g.add_argument("-o", "--output", metavar="FILE", help="write the output to a file instead of stdout")
    g.add_argument("--stats", action="store_true", help="print batch statistics to stderr")
    _add_progress_option(g)
    _add_sampling_options(g)
    _add_model_options(g, "sequences decoded together (default: min(8, number of prompts))")
    g.set_defaults(func=_generate)

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

    try:
        from .bench import add_parser as _add_bench
    except ImportError:  # bench.py not present
        _add_bench = None
    if _add_bench is not None:
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
