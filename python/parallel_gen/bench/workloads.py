"""The bench's workloads: deterministic prompt sets, each in one or more variants.

A workload is what is measured (short prompts, a shared prefix, mixed lengths, ragged
endings, a grammar, concurrent callers); its variants are the request sets timed side by
side (the prefix workload's ``noreuse`` control, the grammar workload's ``free`` run), and
each variant names the implementations that run it. A workload's comparisons are its own
figures: a metric of one (implementation, variant) over another's, taken per round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

WORKLOADS = ("short", "prefix", "mixed", "ragged", "grammar", "concurrent")
# The workloads that compare generate_parallel with the llama-cpp-python loop and
# llama-batched-bench (the others measure the engine against itself).
AGAINST_LLAMA_CPP = ("short", "prefix", "mixed")
MIXED_LENGTHS = (16, 64, 160, 384)  # prompt tokens of the mixed workload, cycled

# Implementation names (see impls.py).
LOOP, PARALLEL, CALLERS, BATCHED_BENCH = "loop", "parallel", "callers", "batched-bench"

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                   "hobbies": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "city", "hobbies"],
}

_QUESTIONS = (
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give three tips for learning to code.",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in one paragraph.",
    "Name five animals that live in the Arctic.",
    "What causes the seasons on Earth?",
    "Summarize the plot of Romeo and Juliet.",
    "Suggest a name for a small coffee shop.",
    "How do vaccines train the immune system?",
    "Write a short poem about autumn leaves.",
    "What is the difference between weather and climate?",
    "List three unusual uses of a paperclip.",
    "Describe a sunset to someone who has never seen one.",
    "Why is the sky blue during the day?",
)
_SUBJECTS = ("The river", "A small robot", "The old library", "Our team", "The mountain village", "A curious cat",
             "The night train", "The city council", "A young painter", "The research station",
             "The lighthouse keeper", "A quiet garden", "The museum guide")
_VERBS = ("carefully studies", "slowly crosses", "quietly remembers", "often visits", "suddenly discovers",
          "patiently builds", "rarely mentions", "happily shares", "never forgets")
_OBJECTS = ("the northern bridge", "an ancient map", "the harvest festival", "a broken clock", "the winter storm",
            "a long list of rules", "the morning market", "a box of letters", "the hidden stairs", "a new recipe",
            "the empty stadium")
_TAILS = ("before sunrise.", "after the long rain.", "with great care.", "for the first time in years.",
          "while everyone is asleep.", "because nobody else will.", "during the spring fair.",
          "without telling anyone.")

TokenCounter = Callable[[str], int]


def _sentence(k: int) -> str:
    """A deterministic, varied English sentence (moduli are coprime-ish: few repeats)."""
    return (f"{_SUBJECTS[k % len(_SUBJECTS)]} {_VERBS[(7 * k + 3) % len(_VERBS)]} "
            f"{_OBJECTS[(5 * k + 1) % len(_OBJECTS)]} {_TAILS[(3 * k + 2) % len(_TAILS)]}")


def _text_of_tokens(count: TokenCounter, head: str, target: int, start: int, tail: str = "") -> str:
    """head + sentences (from sentence #start) + tail, about ``target`` tokens in all."""
    text, k = head, start
    while count(text + tail) < target:
        text += (" " if text and not text.endswith("\n") else "") + _sentence(k)
        k += 1
    return text + tail


def parses_as_json(text: str) -> bool:
    """Whether ``text`` is one JSON document (the grammar workload's check)."""
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@dataclass
class Variant:
    """One set of requests timed as a whole: prompts, their max_tokens, extra sampling."""

    name: str
    prompts: List[str]
    prompt_tokens: List[int]
    max_tokens: List[int]
    """Per prompt (the ragged workload mixes lengths)."""
    impls: Tuple[str, ...]
    """The implementations that run this variant."""
    sampling: Dict[str, Any] = field(default_factory=dict)
    """SamplingParams fields on top of the bench's (greedy, ignore_eos, seed 0)."""
    full_length: bool = True
    """Every output should reach its max_tokens (EOG ignored); shorter ones are counted."""
    check: Optional[Callable[[str], bool]] = None
    """A test of each complete output's text (counted in Measurement.passed_check)."""
    n_ctx: int = 0
    """Tokens per sequence of the Models that run it (set by its Workload: the same for
    every variant of a workload)."""

    @property
    def mean_prompt_tokens(self) -> float:
        return sum(self.prompt_tokens) / len(self.prompt_tokens)

    def info(self) -> Dict[str, Any]:
        tokens = self.prompt_tokens
        return {"prompts": len(self.prompts), "prompt_tokens_total": sum(tokens),
                "prompt_tokens_mean": round(self.mean_prompt_tokens, 1), "prompt_tokens_min": min(tokens),
                "prompt_tokens_max": max(tokens), "max_tokens": sorted(set(self.max_tokens)),
                "sampling": {k: v for k, v in self.sampling.items() if k != "json_schema"},
                "constrained": "json_schema" in self.sampling, "impls": list(self.impls),
                "example_prompt": self.prompts[0]}


@dataclass(frozen=True)
class Comparison:
    """A workload's own figure: ``metric`` of (impl, variant) ``numerator`` over
    ``denominator``, per round and n_parallel; the report gives the medians."""

    name: str
    metric: str
    numerator: Tuple[str, str]
    denominator: Tuple[str, str]
    description: str


@dataclass
class Workload:
    name: str
    description: str
    variants: List[Variant]
    comparisons: Tuple[Comparison, ...] = ()

    def __post_init__(self) -> None:
        n_ctx = -(-(self.max_prompt_tokens + self.max_tokens + 8) // 64) * 64  # rounded up to 64
        for v in self.variants:
            v.n_ctx = n_ctx

    @property
    def max_prompt_tokens(self) -> int:
        return max(max(v.prompt_tokens) for v in self.variants)

    @property
    def max_tokens(self) -> int:
        return max(max(v.max_tokens) for v in self.variants)

    @property
    def sequences(self) -> int:
        return max(len(v.prompts) for v in self.variants)

    def info(self) -> Dict[str, Any]:
        return {"description": self.description, "variants": {v.name: v.info() for v in self.variants},
                "comparisons": [c.name for c in self.comparisons]}


def _question(i: int) -> str:
    return f"Question {i + 1}: {_QUESTIONS[i % len(_QUESTIONS)]}"


def _variant(name: str, prompts: List[str], count: TokenCounter, max_tokens: Any, impls: Tuple[str, ...],
             **kw: Any) -> Variant:
    lengths = list(max_tokens) if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    return Variant(name, prompts, [count(p) for p in prompts], lengths, impls, **kw)


_MEASURED = (LOOP, PARALLEL, BATCHED_BENCH)  # the loop, generate_parallel and the ceiling


def build_workload(name: str, n: int, count: TokenCounter, max_tokens: int, prefix_tokens: int = 300,
                   callers: int = 8) -> Workload:
    """The prompts of one workload (deterministic); ``count`` gives a text's tokens."""
    if name == "short":
        prompts = [f"{_question(i)}\nAnswer:" for i in range(n)]
        return Workload(name, "independent short prompts (a question each)",
                        [_variant("main", prompts, count, max_tokens, _MEASURED)])
    if name == "prefix":
        prefix = _text_of_tokens(count, "Reference notes. Read them, then answer the question at the end.\n",
                                 prefix_tokens, 0)
        # Shared: the prefix first. Control (no reuse possible): the same pieces, the
        # question first, so every prompt differs from its first tokens on.
        shared = [f"{prefix}\n{_question(i)}\nAnswer:" for i in range(n)]
        control = [f"{_question(i)}\n{prefix}\nAnswer:" for i in range(n)]
        return Workload(name, f"prompts sharing a {count(prefix)}-token prefix, then a question each",
                        [_variant("shared", shared, count, max_tokens, _MEASURED),
                         _variant("noreuse", control, count, max_tokens, (PARALLEL,))],
                        (Comparison("prefix_prompt_speedup", "prompt_s", (PARALLEL, "noreuse"), (PARALLEL, "shared"),
                                    "prompt-phase seconds without / with prefix reuse"),))
    if name == "mixed":
        prompts = [_text_of_tokens(count, f"Text {i + 1}.", MIXED_LENGTHS[i % len(MIXED_LENGTHS)] - 4, 3 * i,
                                   "\nSummary:") for i in range(n)]
        return Workload(name, "mixed prompt lengths (about " + ", ".join(map(str, MIXED_LENGTHS)) + " tokens, cycled)",
                        [_variant("main", prompts, count, max_tokens, _MEASURED)])
    if name == "ragged":
        # Half the sequences end early. Alternating: the long ones are left at seq ids
        # 1, 3, 5, ...; llama.cpp decodes separate KV streams in one micro-batch only for
        # consecutive ids, so the engine moves them down (BatchStats.sequence_moves).
        short = max(1, max_tokens // 8)
        alternating = [short if i % 2 == 0 else max_tokens for i in range(n)]
        contiguous = sorted(alternating)
        prompts = [f"{_question(i)}\nAnswer:" for i in range(n)]
        return Workload(name, f"sequences ending at different times ({short} or {max_tokens} tokens)",
                        [_variant("alternating", prompts, count, alternating, (PARALLEL,)),
                         _variant("contiguous", prompts, count, contiguous, (PARALLEL,))],
                        (Comparison("ragged_wall_ratio", "wall_s", (PARALLEL, "alternating"),
                                    (PARALLEL, "contiguous"),
                                    "wall time, short and long outputs alternating / contiguous (1: gaps cost "
                                    "nothing)"),))
    if name == "grammar":
        prompts = [f"Invent person number {i + 1}; describe them as JSON with name, age, city and hobbies:"
                   for i in range(n)]
        free = dict(temperature=0.7, ignore_eos=False)
        return Workload(name, "JSON-schema-constrained against free generation (temperature 0.7, EOG honoured)",
                        [_variant("json_schema", prompts, count, max_tokens, (PARALLEL,),
                                  sampling=dict(free, json_schema=PERSON_SCHEMA), full_length=False,
                                  check=parses_as_json),
                         _variant("free", prompts, count, max_tokens, (PARALLEL,), sampling=free,
                                  full_length=False)],
                        (Comparison("grammar_decode_ratio", "gen_tps", (PARALLEL, "json_schema"), (PARALLEL, "free"),
                                    "generation t/s (decode time), constrained / free"),
                         Comparison("grammar_wall_ratio", "e2e_tps", (PARALLEL, "json_schema"), (PARALLEL, "free"),
                                    "generated tokens per wall second, constrained / free")))
    if name == "concurrent":
        prompts = [f"Question {i}: describe the number {i} in a few words." for i in range(n)]
        return Workload(name, f"{min(callers, n)} threads calling generate_parallel on one Model against one call "
                              "with all their prompts",
                        [_variant("main", prompts, count, max_tokens, (PARALLEL, CALLERS))],
                        (Comparison("callers_ratio", "e2e_tps", (CALLERS, "main"), (PARALLEL, "main"),
                                    "end-to-end t/s, concurrent callers / one call"),))
    raise ValueError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")


def variant_params(variant: Variant, samples: int, prompt: Optional[int] = None) -> Mapping[str, Any]:
    """The SamplingParams fields of ``variant`` (of one prompt's, when they differ)."""
    max_tokens = variant.max_tokens[0 if prompt is None else prompt]
    return dict(dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, seed=0, n=samples), **variant.sampling)
