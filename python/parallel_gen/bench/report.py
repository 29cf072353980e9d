"""From runs to figures: medians over rounds (numpy), per-round ratios, the project's
targets, the printed table, the JSON document and the plot."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .records import METRICS, SCHEMA, ComparisonResult, Report, Row, Run, Target
from .workloads import BATCHED_BENCH, CALLERS, LOOP, PARALLEL, WORKLOADS, Workload

# Targets from the project's issues (2-core CPU, SmolLM2-135M Q4_1, 2 threads, quiet
# machine); reported next to the measured figures, informative only.
TARGET_GEN_VS_BB = 0.95       # generate_parallel generation t/s / batched-bench TG, B=16 and 32
TARGET_E2E_VS_LOOP_16 = 1.9   # end to end vs the loop, 16 prompts
TARGET_E2E_VS_LOOP_32 = 2.0   # end to end vs the loop, 32 prompts
TARGET_PREFIX_SPEEDUP = 5.0   # prompt-phase time without / with prefix reuse, 32 prompts

IMPL_ORDER = {LOOP: 0, PARALLEL: 1, CALLERS: 2, BATCHED_BENCH: 3}

Key = Tuple[str, str, str, int, Optional[int]]  # workload, variant, impl, round, n_parallel


def median(values: Iterable[Optional[float]]) -> Optional[float]:
    """The median of the values that are not None (None when there are none)."""
    vals = np.array([v for v in values if v is not None], dtype=float)
    return float(np.median(vals)) if vals.size else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def aggregate(runs: List[Run], workloads: Sequence[Workload]) -> Report:
    """Medians per (workload, variant, impl, n_parallel), and medians of per-round ratios:
    x_loop (e2e t/s over the loop's), x_bb (gen t/s over batched-bench's at the same B,
    B=1 for the loop) and each workload's comparisons."""
    by_key: Dict[Key, Run] = {(r.workload, r.variant, r.impl, r.round, r.n_parallel): r for r in runs if r.ok}
    for (wl, var, impl, rnd, b), r in by_key.items():
        loop = by_key.get((wl, var, LOOP, rnd, None))
        bb = by_key.get((wl, var, BATCHED_BENCH, rnd, 1 if impl == LOOP else b))
        r.x_loop = ratio(r.get("e2e_tps"), loop.get("e2e_tps")) if loop else None
        r.x_bb = ratio(r.get("gen_tps"), bb.get("gen_tps")) if bb else None

    groups: Dict[Tuple[str, str, str, Optional[int]], List[Run]] = {}
    for r in runs:
        groups.setdefault((r.workload, r.variant, r.impl, r.n_parallel), []).append(r)
    order = _order(workloads)
    rows = []
    for (wl, var, impl, b), rs in sorted(groups.items(), key=lambda kv: order(*kv[0])):
        ok = [r for r in rs if r.ok]
        rows.append(Row(wl, var, impl, b, len(ok), {m: median(r.get(m) for r in ok) for m in METRICS},
                        median(r.x_loop for r in ok), median(r.x_bb for r in ok), rs,
                        [r.error for r in rs if r.error is not None]))

    comparisons = []
    rounds = sorted({r.round for r in runs})
    for w in workloads:
        for c in w.comparisons:
            bs = sorted({r.n_parallel for r in runs if r.workload == w.name and r.impl == c.numerator[0]},
                        key=lambda b: b or 0)
            for b in bs:
                values = []
                for rnd in rounds:
                    num = by_key.get((w.name, c.numerator[1], c.numerator[0], rnd, b))
                    den = by_key.get((w.name, c.denominator[1], c.denominator[0], rnd, b))
                    v = ratio(num.get(c.metric), den.get(c.metric)) if num and den else None
                    if v is not None:
                        values.append(v)
                comparisons.append(ComparisonResult(w.name, c.name, b, c.description, values, median(values)))
    return Report(rows, comparisons, targets(rows, comparisons))


def _order(workloads: Sequence[Workload]) -> Any:
    wl_index = {w: i for i, w in enumerate(WORKLOADS)}
    var_index = {(w.name, v.name): i for w in workloads for i, v in enumerate(w.variants)}

    def key(wl: str, var: str, impl: str, b: Optional[int]) -> Tuple[int, int, int, int]:
        return wl_index.get(wl, 99), var_index.get((wl, var), 99), IMPL_ORDER.get(impl, 99), b or 0
    return key


def targets(rows: List[Row], comparisons: List[ComparisonResult]) -> List[Target]:
    """The project's targets that this run's settings measure."""
    out: List[Target] = []

    def add(name: str, value: Optional[float], goal: float, note: str) -> None:
        if value is not None:
            out.append(Target(name, value, goal, value >= goal, note))

    short = [r for r in rows if r.workload == "short" and r.impl == PARALLEL]
    for r in short:
        if r.n_parallel in (16, 32):
            add(f"gen_vs_batched_bench_B{r.n_parallel}", r.x_bb, TARGET_GEN_VS_BB,
                f"short workload: generation t/s / llama-batched-bench TG at B={r.n_parallel}")
    with_loop = [r for r in short if r.x_loop is not None]
    prompts = with_loop[0].rounds[0].prompts if with_loop else 0
    if prompts >= 16:  # the targets are for 16 and 32 prompts (x 128 tokens)
        best = max(with_loop, key=lambda r: r.x_loop or 0.0)
        add(f"e2e_vs_loop_{prompts}_prompts", best.x_loop, TARGET_E2E_VS_LOOP_32 if prompts >= 32 else
            TARGET_E2E_VS_LOOP_16, f"short workload, best n_parallel ({best.n_parallel}): end-to-end t/s / the "
            "loop's (targets: 1.9x at 16 prompts, 2.0x at 32, 128 tokens each)")
    prefix = [c for c in comparisons if c.name == "prefix_prompt_speedup" and c.median is not None]
    prefix_prompts = max((r.rounds[0].prompts for r in rows if r.workload == "prefix"), default=0)
    if prefix and prefix_prompts >= 32:  # the target is for 32 prompts
        top = max(prefix, key=lambda c: c.n_parallel or 0)
        add(f"prefix_prompt_speedup_B{top.n_parallel}", top.median, TARGET_PREFIX_SPEEDUP,
            "prefix workload: prompt-phase seconds without / with prefix reuse")
    return out


# --------------------------------------------------------------------------- text

def fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: List[Row]) -> str:
    head = ("workload", "variant", "impl", "B", "gen t/s", "prompt t/s", "e2e t/s", "wall s", "host ms/step",
            "peak RSS MiB", "x loop", "x bb")
    cells = [head]
    for r in rows:
        m = r.median
        cells.append((
            r.workload, r.variant, r.impl, "-" if r.n_parallel is None else str(r.n_parallel),
            fmt(m["gen_tps"], ".1f"), fmt(m["prompt_tps"], ".1f"), fmt(m["e2e_tps"], ".1f"),
            fmt(m["wall_s"], ".2f"), fmt(m["host_ms_step"], ".1f"), fmt(m["peak_rss_mib"], ".0f"), fmt(r.x_loop, ".2f"),
            fmt(r.x_bb, ".2f") + (" !" if r.errors else ""),
        ))
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(report: Report) -> str:
    lines = []
    for c in report.comparisons:
        rounds = ", ".join(f"{v:.2f}" for v in c.values)
        lines.append(f"{c.workload}: {c.name} at B={c.n_parallel}: {fmt(c.median, '.2f')} ({c.description}; "
                     f"rounds {rounds or '-'})")
    for r in report.rows:
        checked = r.median.get("passed_check")
        if checked is not None:
            lines.append(f"{r.workload}/{r.variant}/{r.impl}/B={r.n_parallel}: {checked:.0f} of "
                         f"{fmt(r.median['complete'], '.0f')} complete outputs pass the check (medians; the others "
                         "were cut by max_tokens)")
    for t in report.targets:
        lines.append(f"target {t.name}: {t.value:.2f} (target >= {t.target}: {'met' if t.met else 'not met'}) "
                     f"- {t.note}")
    for r in report.rows:
        for e in r.errors:
            lines.append(f"error in {r.workload}/{r.variant}/{r.impl}/B={r.n_parallel}: {e.splitlines()[0]}")
        inc = r.median.get("incomplete")
        if inc:
            lines.append(f"warning: {r.workload}/{r.variant}/{r.impl}/B={r.n_parallel}: {inc:.0f} completions "
                         "ended before max_tokens")
    return "\n".join(lines)


def document(config: Dict[str, Any], workloads: Sequence[Workload], report: Report, table: str) -> Dict[str, Any]:
    """Everything the run measured, as the JSON written by --json."""
    return {"schema": SCHEMA, "config": config, "workloads": {w.name: w.info() for w in workloads},
            **report.to_json(), "table": table}


# --------------------------------------------------------------------------- plot

def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("parallel-gen bench: --plot needs matplotlib, which is not installed: "
                         "pip install matplotlib (or pip install 'parallel_gen[plot]')") from None


def write_plot(path: str, rows: List[Row], config: Dict[str, Any]) -> None:
    """Throughput against n_parallel, one panel per workload: end-to-end t/s of every
    (impl, variant), generation t/s of generate_parallel and of batched-bench, and the
    loop's end-to-end t/s as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = [w for w in WORKLOADS if any(r.workload == w for r in rows)]
    fig, axes = plt.subplots(1, len(wls), figsize=(5.6 * len(wls), 4.4), squeeze=False)
    for ax, wl in zip(axes[0], wls):
        mine = [r for r in rows if r.workload == wl]
        series: Dict[Tuple[str, str, str], List[Tuple[int, float]]] = {}
        for r in mine:
            if r.n_parallel is None:
                continue
            metrics = ("gen_tps",) if r.impl == BATCHED_BENCH else ("e2e_tps", "gen_tps") if r.impl == PARALLEL \
                else ("e2e_tps",)
            for m in metrics:
                if r.median.get(m):
                    series.setdefault((r.impl, r.variant, m), []).append((r.n_parallel, r.median[m]))
        bs: set = set()
        for k, ((impl, var, m), pts) in enumerate(sorted(series.items())):
            pts.sort()
            bs.update(b for b, _ in pts)
            label = f"{impl} ({var}): {'generation' if m == 'gen_tps' else 'end to end'} t/s"
            ax.plot([b for b, _ in pts], [v for _, v in pts], "o-" if m == "e2e_tps" else "s--", color=f"C{k % 10}",
                    label=label)
        loop = next((r for r in mine if r.impl == LOOP and r.median.get("e2e_tps")), None)
        if loop:
            ax.axhline(loop.median["e2e_tps"], color="gray", ls="--", label="llama-cpp-python loop (end to end)")
        if bs:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(bs))
            ax.set_xticklabels([str(b) for b in sorted(bs)])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("n_parallel (B)")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{wl}: {config['prompts']} prompts x {config['max_tokens']} tokens")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{os.path.basename(config['model'])}, {config['threads']} thread(s), "
                 f"flash_attn {config['flash_attn']}, median of {config['repeat']} round(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

