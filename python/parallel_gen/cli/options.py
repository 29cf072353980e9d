"""The options the ``parallel-gen`` commands share, each built from its one source, and
the exit statuses every command returns.

- model options: one flag per :class:`~parallel_gen.ModelConfig` field (MODEL_FLAGS,
  defaults read from the fields), read back by :func:`model_options`;
- sampling options: one flag per :class:`~parallel_gen.SamplingParams` field
  (SAMPLING_FLAGS), read back by :func:`sampling_params`;
- chat template, job input and output, progress and Ray options.

``generate``, ``classify``, ``serve`` (server/cli.py) and the Ray runs (ray/cli.py) all
build their parsers and read their arguments here. Importing it loads no llama.cpp.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import ModelConfig
from ..errors import ParamError
from ..params import SamplingParams


class ExitStatus(enum.IntEnum):
    """The exit status of every ``parallel-gen`` command."""

    OK = 0
    FAILED = 1
    """The model is missing or cannot be loaded, generation failed, or a prompt (row) finished with an error."""
    USAGE = 2
    """Bad arguments or input."""
    INTERRUPTED = 130
    """Ctrl-C."""


EXIT_STATUS_HELP = ("exit status: 0 ok; 1 model or generation failure, or a prompt failed; 2 bad arguments or "
                    "input; 130 interrupted")


def text_or_file(value: str) -> str:
    """'@path' reads the file: grammars and schemas are awkward as shell arguments."""
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    return value


def read_arg_file(flag: str, path: str) -> str:
    """The text of the file an option names; JobInputError (a usage error) when it cannot be read."""
    from ..jobs.formats import JobInputError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise JobInputError(f"{flag} {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None


# -- model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFlag:
    """The command-line flag of one ModelConfig field."""

    field: str
    flags: Tuple[str, ...]
    help: str
    type: Any = int
    """int or str (a value), bool (a switch), or None with ``choices``."""
    metavar: Optional[str] = "N"
    choices: Optional[Dict[str, Any]] = None
    """For a flag whose words stand for values (--flash-attn on): word -> field value."""


AUTO_ON_OFF = {"auto": None, "on": True, "off": False}

# One flag per ModelConfig field (test_cli holds them equal), in --help's order.
MODEL_FLAGS = (
    ModelFlag("n_parallel", ("--n-parallel",), "sequences decoded together (the command says its default)"),
    ModelFlag("n_ctx", ("--n-ctx",), "tokens per sequence, prompt + output (default for generate and classify: "
                                      "sized to the prompts and --max-tokens or the labels; else min(training, "
                                      "4096), capped to half the free memory)"),
    ModelFlag("n_batch", ("--n-batch",), "most tokens per decode call"),
    ModelFlag("n_threads", ("--threads",), "CPU threads (default: every core this process may use)"),
    ModelFlag("n_gpu_layers", ("--n-gpu-layers",), "layers offloaded to a GPU (-1: all; needs a GPU build)"),
    ModelFlag("kv_unified", ("--kv-unified",), "one KV buffer shared by all sequences", bool, None),
    ModelFlag("kv_size", ("--kv-size",), "cells of the shared KV pool (with --kv-unified)"),
    ModelFlag("flash_attn", ("--flash-attn",), "flash attention", None, None, AUTO_ON_OFF),
    ModelFlag("type_k", ("--type-k",), "KV cache type of K", str, "TYPE"),
    ModelFlag("type_v", ("--type-v",), "KV cache type of V", str, "TYPE"),
    ModelFlag("share_prefix", ("--share-prefix",), "decode a prompt prefix (>= 16 tokens) that several prompts "
                                                   "share once and copy its KV (--no-share-prefix: each prompt "
                                                   "decodes its own)", bool, None),
    ModelFlag("prompt_cache", ("--prompt-cache",), "keep finished prompts' KV so a later prompt starting with the "
                                                   "same tokens decodes only the rest (--no-prompt-cache: keep "
                                                   "none)", bool, None),
    ModelFlag("cache_ram", ("--cache-ram",), "MiB of host memory that keeps prompt cache entries whose KV stream "
                                             "is needed for another prompt, restored when a later prompt "
                                             "starts with them (0: none)", int, "MIB"),
    ModelFlag("batch_invariant", ("--batch-invariant",), "a prompt's output never depends on what else is in the "
                                                         "batch: each prompt prefilled alone, generation steps "
                                                         "padded to a fixed minimum of rows (slower; no shared "
                                                         "prefix)", bool, None),
    ModelFlag("backend_sampling", ("--backend-sampling",), "sample in llama.cpp's graph where a prompt's sampler "
                                                           "chain allows it (default: auto, on with GPU layers)",
              None, None, AUTO_ON_OFF),
    ModelFlag("repack", ("--repack",), "repack the weights for llama.cpp's faster CPU kernels (its extra buffer "
                                       "types; default: off when llama.cpp was built with AMX kernels, which "
                                       "crash on recent Intel Xeons, else on)", bool, None),
    ModelFlag("verbose", ("-v", "--verbose"), "show llama.cpp's log and parallel_gen's info log", bool, None),
)
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
# Flags whose default the help states (the others say theirs in words, or are switches).
_SHOWN_DEFAULTS = ("n_batch", "flash_attn", "type_k", "type_v", "share_prefix", "prompt_cache", "cache_ram")


def default_n_parallel(rows: Optional[int]) -> int:
    """The command line's n_parallel when --n-parallel is not given: no more slots than
    ``rows`` (each slot reserves a KV stream of n_ctx tokens), at most ModelConfig's
    default; ModelConfig's default when the number of rows is not known (None)."""
    default = _MODEL_DEFAULTS["n_parallel"]
    return default if rows is None else max(1, min(default, rows))


JOB_N_PARALLEL_HELP = (f"sequences decoded together (default: min({default_n_parallel(None)}, number of rows "
                       "when known))")
"""--n-parallel's help for a job command (see :func:`default_n_parallel`)."""


def add_model_options(p: argparse.ArgumentParser, n_parallel_help: str = JOB_N_PARALLEL_HELP) -> None:
    """The model group: -m/--model and one flag per ModelConfig field. ``n_parallel_help``
    is --n-parallel's help, which says the command's default."""
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="GGUF", help="GGUF file (default: the packaged SmolLM2-135M-Instruct)")
    for flag in MODEL_FLAGS:
        text = n_parallel_help if flag.field == "n_parallel" else flag.help
        if flag.field in _SHOWN_DEFAULTS:
            default = _MODEL_DEFAULTS[flag.field]
            shown = {v: k for k, v in flag.choices.items()}[default] if flag.choices else \
                "on" if default is True else default
            text = f"{text} (default: {shown})"
        add_model_flag(g, flag, text)


# Switches with a --no- form: their default (None) is a choice of its own, not "off".
_BOTH_WAYS = ("share_prefix", "prompt_cache", "repack")


def add_model_flag(g: Any, flag: ModelFlag, text: Optional[str] = None) -> None:
    """One ModelConfig field's flag on a parser or group (``text``: its help, if not the flag's)."""
    text = flag.help if text is None else text
    if flag.field == "verbose":
        g.add_argument(*flag.flags, dest=flag.field, action="store_true", help=text)
    elif flag.type is bool:
        action = argparse.BooleanOptionalAction if flag.field in _BOTH_WAYS else "store_true"
        g.add_argument(*flag.flags, dest=flag.field, action=action, default=None, help=text)
    elif flag.choices is not None:
        g.add_argument(*flag.flags, dest=flag.field, choices=list(flag.choices), help=text)
    else:
        g.add_argument(*flag.flags, dest=flag.field, type=flag.type, metavar=flag.metavar, help=text)


def model_flag(field: str) -> ModelFlag:
    """The flag of ModelConfig field ``field``."""
    return next(f for f in MODEL_FLAGS if f.field == field)


def model_options(args: argparse.Namespace, rows: Optional[int]) -> Dict[str, Any]:
    """The ModelConfig fields the options give (the others keep ModelConfig's defaults),
    n_parallel always (see :func:`default_n_parallel`; ``rows``: the job's rows when
    known), verbose always."""
    kw: Dict[str, Any] = {}
    for flag in MODEL_FLAGS:
        value = getattr(args, flag.field)
        if value is not None:
            kw[flag.field] = flag.choices[value] if flag.choices is not None else value
    if args.n_parallel is None:
        kw["n_parallel"] = default_n_parallel(rows)
    kw["verbose"] = bool(args.verbose)
    return kw


# -- sampling ---------------------------------------------------------------------------
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
    ("cache_prompt", ("--no-cache-prompt",), bool, None,
     "decode every prompt whole and keep none of its KV (SamplingParams.cache_prompt=False)"),
    ("grammar_triggers", ("--grammar-trigger",), str, "REGEX",
     "the grammar applies only from a match of REGEX on (repeatable)"),
]
_REPEATABLE = {"stop", "stop_token_ids", "choices", "logit_bias", "grammar_triggers"}


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """One flag per SamplingParams field, its default shown from SamplingParams()."""
    defaults = SamplingParams()
    g = p.add_argument_group("sampling (defaults: SamplingParams)")
    for field, flags, typ, metavar, text in SAMPLING_FLAGS:
        if typ is bool:
            negated = getattr(defaults, field) is True  # a --no-... flag turns a default-on field off
            g.add_argument(*flags, dest=field, action="store_false" if negated else "store_true", default=None,
                           help=text)
        elif field in _REPEATABLE:
            g.add_argument(*flags, dest=field, type=typ, metavar=metavar, action="append", help=text)
        else:
            default = getattr(defaults, field)
            g.add_argument(*flags, dest=field, type=typ, metavar=metavar,
                           help=f"{text} (default: {default})" if default is not None else text)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of the sampling options given (the others: SamplingParams' defaults)."""
    given = {f: getattr(args, f) for f, *_ in SAMPLING_FLAGS if getattr(args, f) is not None}
    for f in ("grammar", "json_schema"):
        if f in given:
            given[f] = text_or_file(given[f])
    if "logit_bias" in given:
        given["logit_bias"] = _logit_bias(given["logit_bias"])
    return SamplingParams(**given)


def _logit_bias(items: List[str]) -> Dict[int, float]:
    out = {}
    for item in items:
        tok, sep, bias = item.partition("=")
        try:
            out[int(tok)] = float(bias)
        except ValueError:
            sep = ""
        if not sep:
            raise ParamError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS, e.g. 42=-inf", "logit_bias")
    return out


# -- chat template ----------------------------------------------------------------------
def add_chat_template_options(p: argparse.ArgumentParser, implies_chat: bool = True) -> None:
    """--chat-template / --chat-template-file (read back by :func:`chat_template_arg`)."""
    note = "; implies --chat" if implies_chat else ""
    t = p.add_mutually_exclusive_group()
    t.add_argument("--chat-template", metavar="TEMPLATE",
                   help=f"Jinja template text or a llama.cpp built-in name such as chatml (default: the model's{note})")
    t.add_argument("--chat-template-file", metavar="FILE",
                   help="read the Jinja chat template from a file" + (" (implies --chat)" if implies_chat else ""))


def chat_template_arg(args: argparse.Namespace) -> Optional[str]:
    """The chat template the options give (the file's text for --chat-template-file), or None."""
    if args.chat_template_file is None:
        return args.chat_template
    return read_arg_file("--chat-template-file", args.chat_template_file)


def add_chat_options(p: argparse.ArgumentParser, chat_help: str,
                     system_help: str = "system message for every plain prompt (implies --chat)") -> None:
    """--chat, --system and the chat template options of a job command."""
    p.add_argument("--chat", action="store_true", help=chat_help)
    p.add_argument("--system", metavar="TEXT", help=system_help)
    add_chat_template_options(p)


# -- jobs -------------------------------------------------------------------------------
def add_job_input_options(p: argparse.ArgumentParser, noun: str, metavar: str, json_field: str) -> None:
    """Where a file job's prompts (texts) come from: arguments, --file or stdin."""
    p.add_argument("prompts", nargs="*", metavar=metavar, help=f"{noun} (each one argument); '-' reads stdin")
    p.add_argument("-f", "--file", metavar="FILE", help=f"read {noun} from FILE ('-' for stdin)")
    p.add_argument("--input-format", choices=["auto", "text", "jsonl", "csv", "parquet"], default="auto",
                   help="format of --file/stdin (default: by extension; else JSONL when the first non-blank "
                        f"line is a JSON object with {json_field}, else text, one {noun[:-1]} per line)")


def add_job_output_options(p: argparse.ArgumentParser, formats: Sequence[str], format_help: str) -> None:
    """Where a file job's rows go, what happens to an existing output, its statistics and
    progress bar, and the Ray options that run it on a cluster instead."""
    p.add_argument("-o", "--output", metavar="FILE", help="write the rows to FILE instead of stdout")
    p.add_argument("--output-format", "--format", dest="output_format", choices=list(formats), default="auto",
                   help=format_help)
    w = p.add_mutually_exclusive_group()
    w.add_argument("--resume", action="store_true",
                   help="continue the job that wrote --output: skip its rows, redo a torn last row")
    w.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--lookahead", type=int, metavar="N",
                   help="most rows in flight, read but not written yet (default: 4 per slot)")
    p.add_argument("--stats", action="store_true", help="print the job's statistics to stderr")
    add_ray_options(p)
    add_progress_option(p)


def add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal and tqdm is installed)")


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """--ray [ADDRESS] and the actor pool (see ray/cli.py)."""
    r = p.add_argument_group("Ray (pip install 'parallel_gen[ray]')")
    r.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the job on a Ray cluster (auto, ray://HOST:PORT; none: a local one): -f and -o are "
                        "Parquet or JSONL files or directories every node can read; -o is written as a directory")
    r.add_argument("--ray-actors", type=int, default=1, metavar="N",
                   help="Ray actors, one Model each, with --threads CPUs each (default: 1)")
    r.add_argument("--batch-size", type=int, metavar="N", help="rows per Ray batch (default: 4 per slot)")
