"""What the bench measures and reports, as named types (serialised to JSON as they are)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

SCHEMA = "parallel_gen.bench/2"


@dataclass
class Measurement:
    """One timed run of one implementation on one variant."""

    wall_s: float
    prompt_tokens: int
    completion_tokens: int
    e2e_tps: float
    """Generated tokens per second of wall time."""
    gen_tps: Optional[float] = None
    """Generated tokens per second of generation time (the loop: of wall time)."""
    prompt_tps: Optional[float] = None
    prompt_s: Optional[float] = None
    gen_s: Optional[float] = None
    peak_rss_mib: Optional[float] = None
    incomplete: int = 0
    """Outputs that ended before their max_tokens although the variant expects full length."""
    decode_calls: Optional[int] = None
    host_ms_step: Optional[float] = None
    """Engine time outside llama_decode per decode call (BatchStats.host_ms_per_step)."""
    failed: Optional[int] = None
    prefix_tokens_reused: Optional[int] = None
    sequence_moves: Optional[int] = None
    complete: Optional[int] = None
    """Outputs that ended on their own ("stop"), where the variant has a check."""
    passed_check: Optional[int] = None
    """Complete outputs that pass the variant's check (the grammar workload: valid JSON)."""
    raw: Optional[Dict[str, Any]] = None
    """llama-batched-bench's own jsonl row."""


METRICS = ("wall_s", "gen_tps", "prompt_tps", "e2e_tps", "prompt_s", "gen_s", "peak_rss_mib", "prompt_tokens",
           "completion_tokens", "incomplete", "decode_calls", "host_ms_step", "prefix_tokens_reused", "sequence_moves",
           "complete", "passed_check")


@dataclass
class Run:
    """A measurement (or the error that stopped it) with where it was taken."""

    workload: str
    variant: str
    impl: str
    n_parallel: Optional[int]
    round: int
    prompts: int
    measurement: Optional[Measurement] = None
    error: Optional[str] = None
    x_loop: Optional[float] = None
    """e2e t/s over the loop's, same workload, variant and round."""
    x_bb: Optional[float] = None
    """gen t/s over llama-batched-bench's at the same B (B=1 for the loop), same round."""

    @property
    def ok(self) -> bool:
        return self.measurement is not None

    def get(self, metric: str) -> Optional[float]:
        return None if self.measurement is None else getattr(self.measurement, metric)


@dataclass
class Row:
    """The medians of one (workload, variant, impl, n_parallel) over the rounds."""

    workload: str
    variant: str
    impl: str
    n_parallel: Optional[int]
    rounds_ok: int
    median: Dict[str, Optional[float]]
    x_loop: Optional[float]
    x_bb: Optional[float]
    rounds: List[Run] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)


@dataclass
class ComparisonResult:
    """A workload comparison's per-round values and their median, at one n_parallel."""

    workload: str
    name: str
    n_parallel: Optional[int]
    description: str
    values: List[float]
    median: Optional[float]


@dataclass
class Target:
    """A figure the project set itself, where this run's settings measure it."""

    name: str
    value: float
    target: float
    met: bool
    note: str


@dataclass
class Report:
    rows: List[Row]
    comparisons: List[ComparisonResult]
    targets: List[Target]

    def to_json(self) -> Dict[str, Any]:
        return {"results": [asdict(r) for r in self.rows], "comparisons": [asdict(c) for c in self.comparisons],
                "targets": [asdict(t) for t in self.targets]}
