"""agreement: how coders (models, prompts, people) agree with gold labels and with each other.

Per coder against gold: accuracy, per-class precision/recall/F1/support, macro and
weighted F1, Cohen's kappa and the confusion matrix, computed by scikit-learn (the
``annotate`` extra, imported on first use). Per pair of coders: percent agreement and
Cohen's kappa. All coders: Krippendorff's alpha (alpha.py, our own). Percentile
bootstrap intervals resample items with a seeded generator; a replicate's statistics come
from its confusion (coincidence) matrices, a weighted sum of per-item ones, so a thousand
replicates cost a few matrix products (tests hold them equal to scikit-learn's too).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ParamError, ParamTypeError
from .alpha import LEVELS, alpha_from_coincidences, item_coincidences

DEFAULT_BOOTSTRAP = 1000


@dataclass(frozen=True)
class Estimate:
    """A statistic and its percentile bootstrap interval (None when not asked for or
    undefined in every replicate). ``value`` is NaN when the statistic is undefined
    (Cohen's kappa when gold and coder use one and the same label)."""

    value: float
    low: Optional[float] = None
    high: Optional[float] = None


@dataclass(frozen=True)
class ClassScores:
    """One label's precision, recall, F1 and support (items whose gold label it is)."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class CoderScores:
    """One coder against gold, on the items it labelled."""

    coder: str
    n: int
    """Items with a label from this coder (and gold)."""
    missing: int
    """Items this coder left without a label (errors, skipped): not in ``n``."""
    accuracy: Estimate
    macro_f1: Estimate
    """Mean F1 over the labels in gold or in this coder's labels (scikit-learn's default)."""
    weighted_f1: float
    kappa: Estimate
    per_class: List[ClassScores]
    """One per label, in the order of :attr:`Agreement.labels`."""
    confusion: List[List[int]]
    """Rows: gold label; columns: this coder's label; both in label order."""


@dataclass(frozen=True)
class PairScores:
    """Two coders on the items both labelled."""

    coder_a: str
    coder_b: str
    n: int
    percent_agreement: float
    kappa: Estimate


@dataclass(frozen=True)
class AlphaScore:
    """Krippendorff's alpha over all coders."""

    level: str
    alpha: Estimate
    items: int
    """Items with two labels or more (pairable); the others add nothing."""
    values: int
    """Labels in those items."""


@dataclass(frozen=True)
class Agreement:
    """What :func:`agreement` found (``to_dict()`` for JSON, ``report()`` for the
    terminal, ``plot(path)`` for a picture, ``tables()`` for data frames)."""

    labels: List[str]
    coders: List[str]
    items: int
    level: str
    ci: Optional[float]
    seed: int
    n_boot: int
    missing: Dict[str, int]
    """coder -> items without a label from it."""
    gold: List[CoderScores] = field(default_factory=list)
    """One per coder when gold was given, else empty."""
    pairs: List[PairScores] = field(default_factory=list)
    alpha: Optional[AlphaScore] = None
    """None with fewer than two coders."""

    def to_dict(self) -> Dict[str, Any]:
        """Everything, JSON-ready (NaN as None)."""
        return _json_ready(asdict(self))

    def tables(self) -> Dict[str, List[Dict[str, Any]]]:
        """One flat table (a list of records) per section: ``coders`` (vs gold),
        ``per_class``, ``confusion`` (long: coder, gold, label, count), ``pairs``, ``alpha``."""
        coders, per_class, confusion = [], [], []
        for s in self.gold:
            coders.append({"coder": s.coder, "n": s.n, "missing": s.missing, **_flat("accuracy", s.accuracy),
                           **_flat("macro_f1", s.macro_f1), "weighted_f1": s.weighted_f1,
                           **_flat("kappa", s.kappa)})
            per_class += [{"coder": s.coder, **asdict(c)} for c in s.per_class]
            confusion += [{"coder": s.coder, "gold": g, "label": lab, "count": s.confusion[i][j]}
                          for i, g in enumerate(self.labels) for j, lab in enumerate(self.labels)]
        pairs = [{"coder_a": p.coder_a, "coder_b": p.coder_b, "n": p.n, "percent_agreement": p.percent_agreement,
                  **_flat("kappa", p.kappa)} for p in self.pairs]
        alpha = ([{"level": self.alpha.level, **_flat("alpha", self.alpha.alpha), "items": self.alpha.items,
                   "values": self.alpha.values}] if self.alpha is not None else [])
        out = {"coders": coders, "per_class": per_class, "confusion": confusion, "pairs": pairs, "alpha": alpha}
        return _json_ready(out)

    def report(self) -> str:
        """A text report for the terminal."""
        from .report import text_report

        return text_report(self)

    def __str__(self) -> str:
        return self.report()

    def plot(self, path: Optional[str] = None) -> Any:
        """Confusion-matrix heatmaps (one per coder, against gold) and the coder x coder
        kappa matrix, in one matplotlib figure; saved to ``path`` when given. Needs
        matplotlib (the ``plot`` extra). Returns the Figure."""
        from .report import plot_agreement

        return plot_agreement(self, path)


def agreement(codings: Any, gold: Any = None, labels: Optional[Sequence[str]] = None, level: str = "nominal",
              ci: Optional[float] = 0.95, seed: int = 0, *, n_boot: int = DEFAULT_BOOTSTRAP, item: str = "item",
              coder: str = "coder", label: str = "label") -> Agreement:
    """Agreement of coders with gold labels and with each other.

    Args:
        codings: a :func:`parallel_gen.compare` result; a long table (a pandas DataFrame,
            or an iterable of mappings) with an ``item``, a ``coder`` and a ``label``
            column; or a mapping coder -> labels in item order. A missing label (None,
            NaN, "") is counted per coder and left out as Krippendorff's alpha leaves
            missing values out.
        gold: the true labels: a sequence in item order (for a mapping of coders, or a
            long table's items in order of first appearance), a mapping item -> label, or
            the name of a long table's gold column. Every item needs one. A compare
            result carries its own.
        labels: the label set in its order (required for ``level`` ordinal and interval;
            default: as they first appear, numbers sorted). Confusion matrices and
            per-class scores follow it.
        level: Krippendorff's alpha's metric: "nominal", "ordinal" (labels ordered) or
            "interval" (the labels' numeric values, else their positions).
        ci: the bootstrap interval's coverage (0 < ci < 1), None for none.
        seed: the bootstrap's seed: the same seed gives the same intervals.
        n_boot: bootstrap replicates.
        item, coder, label: a long table's column names.

    Raises:
        ParamError, ParamTypeError: malformed codings, a label (gold or coded) that is
            not in ``labels``, an item without gold, one coder and no gold, a bad
            ``level``, ``ci`` or ``n_boot``, before any computation.
        ImportError: scikit-learn is not installed (pip install 'parallel_gen[annotate]').
    """
    if level not in LEVELS:
        raise ParamError(f"level={level!r}: must be one of {', '.join(map(repr, LEVELS))}", "level")
    if ci is not None and (isinstance(ci, bool) or not isinstance(ci, (int, float)) or not 0 < ci < 1):
        raise ParamError(f"ci={ci!r}: must be a coverage between 0 and 1 (0.95) or None", "ci")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ParamError(f"n_boot={n_boot!r}: must be an int >= 1", "n_boot")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParamTypeError(f"seed must be an int, got {type(seed).__name__}", "seed")
    if level != "nominal" and labels is None:
        raise ParamError(f"level={level!r} needs labels=[...] in their order", "labels")
    table = codings_table(codings, gold, labels, item=item, coder=coder, label=label)
    if len(table.coders) < 2 and table.gold is None:
        raise ParamError(f"one coder ({table.coders[0]!r}) and no gold: nothing to agree with "
                         "(Krippendorff's alpha needs two coders or more)", "codings")
    metrics = require_sklearn()
    with warnings.catch_warnings():  # an undefined kappa is reported as NaN (null), not warned about
        warnings.simplefilter("ignore")
        return _compute(table, level, ci, seed, n_boot, metrics)


@dataclass(frozen=True)
class CodingsTable:
    """Codings as arrays: ``codes`` is coders x items of label indices (-1: missing)."""

    items: List[Hashable]
    coders: List[str]
    labels: List[str]
    codes: np.ndarray
    gold: Optional[np.ndarray]


def codings_table(codings: Any, gold: Any = None, labels: Optional[Sequence[str]] = None, *, item: str = "item",
                  coder: str = "coder", label: str = "label") -> CodingsTable:
    """Checks and indexes ``codings`` and ``gold`` (see :func:`agreement`)."""
    if hasattr(codings, "agreement_input"):  # a compare result
        rows, own_gold = codings.agreement_input()
        gold = own_gold if gold is None else gold
        item, coder, label = "item", "coder", "label"
    elif hasattr(codings, "to_dict") and hasattr(codings, "columns"):  # a pandas DataFrame
        rows = codings.to_dict("records")
    elif isinstance(codings, Mapping):
        rows = _rows_of_mapping(codings)
        item, coder, label = "item", "coder", "label"
    elif isinstance(codings, (str, bytes)) or not isinstance(codings, Iterable):
        raise ParamTypeError("codings must be a compare result, a long table (DataFrame or records of item, "
                             f"coder, label) or a mapping coder -> labels, got {type(codings).__name__}", "codings")
    else:
        rows = list(codings)
    items: Dict[Hashable, int] = {}
    coders: Dict[str, int] = {}
    cells: Dict[Tuple[int, int], Optional[str]] = {}
    gold_cells: Dict[int, Any] = {}
    gold_column = gold if isinstance(gold, str) else None
    for n, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ParamTypeError(f"codings[{n}] must be a mapping with {item!r}, {coder!r}, {label!r}, "
                                 f"got {type(row).__name__}", "codings")
        for col in (item, coder, label) + ((gold_column,) if gold_column else ()):
            if col not in row:
                raise ParamError(f"codings[{n}] has no {col!r} column (it has {list(row)})", "codings")
        i = items.setdefault(_key(row[item]), len(items))
        c = coders.setdefault(str(row[coder]), len(coders))
        value = _label(row[label])
        if (c, i) in cells and cells[(c, i)] != value:
            raise ParamError(f"coder {row[coder]!r} labels item {row[item]!r} twice ({cells[(c, i)]!r} and "
                             f"{value!r})", "codings")
        cells[(c, i)] = value
        if gold_column:
            g = _label(row[gold_column])
            if gold_cells.get(i, g) != g:
                raise ParamError(f"item {row[item]!r} has two gold labels ({gold_cells[i]!r} and {g!r})", "gold")
            gold_cells[i] = g
    if not coders:
        raise ParamError("codings is empty: no coder labelled anything", "codings")
    item_list = list(items)
    gold_list = _gold_list(gold, gold_cells if gold_column else None, item_list)
    label_list = _labels(labels, gold_list, cells.values())
    index = {lab: k for k, lab in enumerate(label_list)}
    codes = np.full((len(coders), len(item_list)), -1, dtype=np.int64)
    for (c, i), value in cells.items():
        if value is None:
            continue
        if value not in index:
            name = list(coders)[c]
            raise ParamError(f"coder {name!r} gives item {item_list[i]!r} the label {value!r}, which is not one of "
                             f"the labels {label_list}", "codings")
        codes[c, i] = index[value]
    gold_codes = None
    if gold_list is not None:
        for i, g in enumerate(gold_list):
            if g not in index:
                raise ParamError(f"gold label {g!r} (item {item_list[i]!r}) is not one of the labels {label_list}",
                                 "gold")
        gold_codes = np.array([index[g] for g in gold_list], dtype=np.int64)
    return CodingsTable(item_list, list(coders), label_list, codes, gold_codes)


def check_gold(gold: Any, labels: Sequence[str], n_items: int) -> List[str]:
    """``gold`` (a sequence of labels in item order) checked against ``labels`` and the
    number of items; the labels as str."""
    items: List[Hashable] = list(range(n_items))
    values = _gold_list(gold, None, items) or []
    for i, g in enumerate(values):
        if g not in labels:
            raise ParamError(f"gold label {g!r} (item {i}) is not one of the labels {list(labels)}", "gold")
    return values


def _rows_of_mapping(codings: Mapping[Any, Any]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    length = None
    for name, values in codings.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ParamTypeError(f"codings[{name!r}] must be a sequence of labels in item order, "
                                 f"got {type(values).__name__}", "codings")
        values = list(values)
        if length is not None and len(values) != length:
            raise ParamError(f"codings[{name!r}] has {len(values)} labels, the coders before it {length}: "
                             "give every coder a label (None when missing) for every item", "codings")
        length = len(values)
        rows += [{"item": i, "coder": name, "label": v} for i, v in enumerate(values)]
    return rows


def _key(value: Any) -> Hashable:
    try:
        hash(value)
    except TypeError:
        raise ParamTypeError(f"an item id must be hashable, got {type(value).__name__}", "codings") from None
    return value


def _label(value: Any) -> Optional[str]:
    """A label as text; None for a missing one (None, NaN, "")."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 1.0 read back from a table is the label "1"
    return str(value)


def _gold_list(gold: Any, cells: Optional[Dict[int, Any]], items: List[Hashable]) -> Optional[List[str]]:
    if gold is None:
        return None
    if cells is not None:
        values = [cells.get(i) for i in range(len(items))]
    elif isinstance(gold, Mapping):
        values = [_label(gold[it]) if it in gold else None for it in items]
    elif isinstance(gold, (str, bytes)) or not isinstance(gold, Iterable):
        raise ParamTypeError(f"gold must be a sequence of labels, a mapping item -> label or a column name, "
                             f"got {type(gold).__name__}", "gold")
    else:
        values = [_label(g) for g in gold]
        if len(values) != len(items):
            raise ParamError(f"gold has {len(values)} labels for {len(items)} items", "gold")
    missing = [items[i] for i, v in enumerate(values) if v is None]
    if missing:
        raise ParamError(f"gold has no label for {len(missing)} of {len(items)} items (first: {missing[:5]}): "
                         "every item needs one (leave unlabelled items out of the study)", "gold")
    return values  # type: ignore[return-value]


def _labels(labels: Optional[Sequence[str]], gold: Optional[List[str]], coded: Iterable[Optional[str]]) -> List[str]:
    if labels is not None:
        if isinstance(labels, (str, bytes)):
            raise ParamTypeError("labels must be a list of str, got a single str", "labels")
        out = [str(lab) for lab in labels]
        if not out or len(set(out)) != len(out):
            raise ParamError(f"labels={out!r}: give each label once, at least one", "labels")
        return out
    seen: Dict[str, None] = {}
    for v in [*(gold or []), *coded]:
        if v is not None:
            seen.setdefault(v, None)
    out = list(seen)
    try:
        return sorted(out, key=float)
    except ValueError:
        return out


def require_sklearn() -> Any:
    try:
        from sklearn import metrics
    except ImportError:
        raise ImportError("agreement needs scikit-learn, which is not installed: "
                          "pip install 'parallel_gen[annotate]'") from None
    return metrics


def _label_values(labels: List[str]) -> Optional[np.ndarray]:
    """The interval level's numbers: the labels' values when all are numbers, else None (positions)."""
    try:
        return np.array([float(lab) for lab in labels])
    except ValueError:
        return None


def _compute(t: CodingsTable, level: str, ci: Optional[float], seed: int, n_boot: int, metrics: Any) -> Agreement:
    n_items, k = len(t.items), len(t.labels)
    rng = np.random.default_rng(seed)
    weights = None
    if ci is not None:
        draws = rng.integers(0, n_items, size=(n_boot, n_items))
        weights = np.zeros((n_boot, n_items))
        np.add.at(weights, (np.repeat(np.arange(n_boot), n_items), draws.ravel()), 1.0)
    lab_idx = list(range(k))
    missing = {name: int((t.codes[c] < 0).sum()) for c, name in enumerate(t.coders)}
    gold_scores: List[CoderScores] = []
    if t.gold is not None:
        for c, name in enumerate(t.coders):
            have = t.codes[c] >= 0
            y, p = t.gold[have], t.codes[c][have]
            boot = _boot_confusions(weights, t.gold, t.codes[c], k)
            gold_scores.append(_coder_scores(metrics, name, y, p, lab_idx, t.labels, missing[name], boot, ci))
    pairs: List[PairScores] = []
    for a in range(len(t.coders)):
        for b in range(a + 1, len(t.coders)):
            both = (t.codes[a] >= 0) & (t.codes[b] >= 0)
            x, y = t.codes[a][both], t.codes[b][both]
            n = int(both.sum())
            kappa = float(metrics.cohen_kappa_score(x, y, labels=lab_idx)) if n else math.nan
            boot = _boot_confusions(weights, t.codes[a], t.codes[b], k)
            pairs.append(PairScores(t.coders[a], t.coders[b], n, float((x == y).mean()) if n else math.nan,
                                    _estimate(kappa, None if boot is None else _kappa(boot), ci)))
    alpha = None
    if len(t.coders) >= 2:
        per_item = item_coincidences(t.codes, k)
        values = _label_values(t.labels) if level == "interval" else None
        value = float(alpha_from_coincidences(per_item.sum(axis=0), level, values))
        reps = None
        if weights is not None:
            reps = alpha_from_coincidences(np.einsum("bi,ick->bck", weights, per_item), level, values)
        m = (t.codes >= 0).sum(axis=0)
        alpha = AlphaScore(level, _estimate(value, reps, ci), int((m >= 2).sum()), int(m[m >= 2].sum()))
    return Agreement(t.labels, t.coders, n_items, level, ci, seed, n_boot, missing, gold_scores, pairs, alpha)


def _coder_scores(metrics: Any, name: str, y: np.ndarray, p: np.ndarray, lab_idx: List[int], labels: List[str],
                  missing: int, boot: Optional[np.ndarray], ci: Optional[float]) -> CoderScores:
    n = len(y)
    if n == 0:
        nan = Estimate(math.nan)
        return CoderScores(name, 0, missing, nan, nan, math.nan, nan,
                           [ClassScores(lab, math.nan, math.nan, math.nan, 0) for lab in labels],
                           [[0] * len(labels) for _ in labels])
    prec, rec, f1, support = metrics.precision_recall_fscore_support(y, p, labels=lab_idx, zero_division=0)
    macro = metrics.precision_recall_fscore_support(y, p, average="macro", zero_division=0)[2]
    weighted = metrics.precision_recall_fscore_support(y, p, average="weighted", zero_division=0)[2]
    kappa = float(metrics.cohen_kappa_score(y, p, labels=lab_idx))
    confusion = metrics.confusion_matrix(y, p, labels=lab_idx)
    per_class = [ClassScores(lab, float(prec[j]), float(rec[j]), float(f1[j]), int(support[j]))
                 for j, lab in enumerate(labels)]
    acc = float(metrics.accuracy_score(y, p))
    return CoderScores(name, n, missing, _estimate(acc, None if boot is None else _accuracy(boot), ci),
                       _estimate(float(macro), None if boot is None else _macro_f1(boot), ci), float(weighted),
                       _estimate(kappa, None if boot is None else _kappa(boot), ci), per_class, confusion.tolist())


# -- bootstrap replicates from confusion matrices ---------------------------------------
def _boot_confusions(weights: Optional[np.ndarray], rows: np.ndarray, cols: np.ndarray, k: int) -> Optional[np.ndarray]:
    """replicates x k x k confusion matrices of (rows, cols) over the items both have."""
    if weights is None:
        return None
    both = (rows >= 0) & (cols >= 0)
    onehot = np.zeros((len(rows), k * k))
    onehot[np.nonzero(both)[0], rows[both] * k + cols[both]] = 1.0
    return (weights @ onehot).reshape(-1, k, k)


def _accuracy(cm: np.ndarray) -> np.ndarray:
    n = cm.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.trace(cm, axis1=1, axis2=2) / n


def _kappa(cm: np.ndarray) -> np.ndarray:
    """Cohen's kappa as scikit-learn computes it: 1 - sum(observed off-diagonal) / sum(expected off-diagonal)."""
    n = cm.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.einsum("bi,bj->bij", cm.sum(axis=2), cm.sum(axis=1)) / n[:, None, None]
        off = 1.0 - np.eye(cm.shape[1])
        return 1.0 - (cm * off).sum(axis=(1, 2)) / (expected * off).sum(axis=(1, 2))


def _macro_f1(cm: np.ndarray) -> np.ndarray:
    """Mean F1 over the labels in gold or in the predictions (zero_division=0)."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(axis=2) + cm.sum(axis=1)
    present = denom > 0
    f1 = np.where(present, 2 * tp / np.where(present, denom, 1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return f1.sum(axis=1) / present.sum(axis=1)


def _estimate(value: float, replicates: Optional[np.ndarray], ci: Optional[float]) -> Estimate:
    if replicates is None or ci is None:
        return Estimate(value)
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return Estimate(value)
    low, high = np.percentile(finite, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return Estimate(value, float(low), float(high))


def _flat(name: str, e: Estimate) -> Dict[str, Any]:
    return {name: e.value, f"{name}_low": e.low, f"{name}_high": e.high}


def _json_ready(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, np.generic):
        return _json_ready(x.item())
    return x


__all__ = ["Agreement", "AlphaScore", "ClassScores", "CoderScores", "Estimate", "PairScores", "agreement",
           "codings_table"]
