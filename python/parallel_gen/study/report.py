"""An Agreement for people: a text report and a matplotlib figure."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, List, Optional

if TYPE_CHECKING:
    from .agreement import Agreement, Estimate


def _num(x: Optional[float]) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _est(e: "Estimate") -> str:
    if e.low is None or e.high is None:
        return _num(e.value)
    return f"{_num(e.value)} [{_num(e.low)}, {_num(e.high)}]"


def text_report(a: "Agreement") -> str:
    """The agreement as aligned text: coders vs gold, pairs, alpha."""
    ci = f" ({round(a.ci * 100)}% bootstrap intervals, {a.n_boot} replicates, seed {a.seed})" if a.ci else ""
    lines: List[str] = [f"{a.items} items, {len(a.coders)} coders, labels: {', '.join(a.labels)}{ci}"]
    width = max(len(c) for c in a.coders + ["coder"])
    if a.gold:
        lines += ["", "against gold:",
                  f"  {'coder':<{width}}  {'n':>4} {'miss':>4}  {'accuracy':<21}  {'macro F1':<21}  {'wF1':>5}  kappa"]
        for s in a.gold:
            lines.append(f"  {s.coder:<{width}}  {s.n:>4} {s.missing:>4}  {_est(s.accuracy):<21}  "
                         f"{_est(s.macro_f1):<21}  {_num(s.weighted_f1):>5}  {_est(s.kappa)}")
        for s in a.gold:
            lines += ["", f"  {s.coder}: per class (P / R / F1 / support) and confusion (rows gold, columns coder)"]
            lw = max(len(lab) for lab in a.labels)
            cw = max(4, min(lw, 12))  # confusion columns: the labels, cut at 12 characters
            lines.append(f"    {'':<{lw}}  {'P':>5} {'R':>5} {'F1':>5} {'sup':>4}   " +
                         " ".join(f"{lab[:cw]:>{cw}}" for lab in a.labels))
            for c, row in zip(s.per_class, s.confusion):
                lines.append(f"    {c.label:<{lw}}  {_num(c.precision)} {_num(c.recall)} {_num(c.f1)} {c.support:>4}   "
                             + " ".join(f"{v:>{cw}}" for v in row))
    if a.pairs:
        lines += ["", "between coders:", f"  {'coder A':<{width}}  {'coder B':<{width}}  {'n':>4}  agree  kappa"]
        for p in a.pairs:
            lines.append(f"  {p.coder_a:<{width}}  {p.coder_b:<{width}}  {p.n:>4}  {_num(p.percent_agreement)}  "
                         f"{_est(p.kappa)}")
    if a.alpha is not None:
        lines += ["", f"Krippendorff's alpha ({a.alpha.level}): {_est(a.alpha.alpha)} "
                      f"over {a.alpha.items} pairable items, {a.alpha.values} labels"]
    missing = {c: m for c, m in a.missing.items() if m}
    if missing:
        lines += ["", "missing labels: " + ", ".join(f"{c} {m}" for c, m in missing.items())]
    return "\n".join(lines)


def plot_agreement(a: "Agreement", path: Optional[str] = None) -> Any:
    """Confusion heatmaps per coder (cells: counts, shade: share of the gold row) and the
    coder x coder kappa matrix."""
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        raise ImportError("Agreement.plot needs matplotlib, which is not installed: "
                          "pip install 'parallel_gen[plot]'") from None
    panels = len(a.gold) + (1 if len(a.coders) >= 2 else 0)
    if panels == 0:
        raise ValueError("nothing to plot: no gold and fewer than two coders")
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    k = len(a.labels)
    side = max(3.2, 0.55 * k + 1.8)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    for ax in axes.ravel()[panels:]:
        ax.axis("off")
    for ax, s in zip(axes.ravel(), a.gold):
        cm = np.array(s.confusion, dtype=float)
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if share[i, j] > 0.6 else "black", fontsize=9)
        ax.set_xticks(range(k), a.labels, rotation=45, ha="right")
        ax.set_yticks(range(k), a.labels)
        ax.set_xlabel("coder's label")
        ax.set_ylabel("gold label")
        ax.set_title(f"{s.coder}\naccuracy {_num(s.accuracy.value)}, kappa {_num(s.kappa.value)}", fontsize=9)
    if len(a.coders) >= 2:
        ax = axes.ravel()[len(a.gold)]
        n = len(a.coders)
        m = np.eye(n)
        for p in a.pairs:
            i, j = a.coders.index(p.coder_a), a.coders.index(p.coder_b)
            m[i, j] = m[j, i] = p.kappa.value
        im = ax.imshow(m, cmap="RdYlGn", vmin=-1, vmax=1)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, _num(m[i, j]).strip(), ha="center", va="center", fontsize=8)
        short = [c if len(c) <= 22 else c[:9] + "…" + c[-12:] for c in a.coders]  # the end tells templates apart
        ax.set_xticks(range(n), short, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), short, fontsize=8)
        title = "Cohen's kappa between coders"
        if a.alpha is not None:
            title += f"\nKrippendorff's alpha ({a.alpha.level}) {_num(a.alpha.alpha.value)}"
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
