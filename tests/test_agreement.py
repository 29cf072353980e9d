"""pg.agreement: its metrics equal scikit-learn's, its Krippendorff's alpha equals the
`krippendorff` package's (GPL-3.0: a test-only reference), its bootstrap intervals equal
a percentile bootstrap recomputed with those references on the same seeded draws, and
bad input fails with a clear error before any computation. No model: pure statistics.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import parallel_gen as pg
from parallel_gen.study.alpha import krippendorff_alpha

from conftest import import_extra

krippendorff = import_extra("krippendorff", "test")  # GPL-3.0: a test-only reference, never a dependency
metrics = import_extra("sklearn.metrics", "annotate")

LEVELS = ("nominal", "ordinal", "interval")


def reference_alpha(codes, k, level):
    """krippendorff.alpha on coders x items of indices (-1 missing), NaN where it finds alpha undefined."""
    data = np.where(np.asarray(codes) < 0, np.nan, np.asarray(codes, dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return krippendorff.alpha(reliability_data=data, level_of_measurement=level, value_domain=list(range(k)))


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


# Krippendorff's own worked example (2011): 4 coders, 12 units, missing values.
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, -1, -1, -1],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, -1, 3],
    [-1, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, -1],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, -1],
]
FIXED = {
    "krippendorff_2011": ([[-1 if v < 0 else v - 1 for v in row] for row in KRIPPENDORFF_2011], 5),
    "an_unused_label": ([[0, 1, 1, 3, 0, 3], [0, 1, 3, 3, 0, 1], [1, 1, 3, 3, -1, 1]], 5),  # label 2 and 4 unused
    "one_class_only": ([[1, 1, 1, 1], [1, 1, -1, 1]], 3),  # alpha undefined: NaN for both
    "two_coders_complete": ([[0, 1, 2, 0, 1, 2, 0, 0], [0, 1, 2, 1, 1, 2, 0, 2]], 3),
    "items_with_one_value": ([[0, -1, 1, 2, -1], [0, 1, -1, 2, -1], [1, -1, -1, 2, 0]], 3),
}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", sorted(FIXED))
def test_alpha_equals_the_krippendorff_package_on_fixed_data(name, level):
    codes, k = FIXED[name]
    ours = krippendorff_alpha(codes, k, level)
    assert same(ours, reference_alpha(codes, k, level))
    if name == "one_class_only":
        assert math.isnan(ours)


def test_alpha_of_krippendorffs_worked_example_is_his_published_value():
    codes, k = FIXED["krippendorff_2011"]
    assert krippendorff_alpha(codes, k, "nominal") == pytest.approx(0.743, abs=5e-4)  # his Table, nominal
    assert krippendorff_alpha(codes, k, "interval") == pytest.approx(0.849, abs=5e-4)


def test_alpha_equals_the_krippendorff_package_on_random_data():
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(150):
        coders, items, k = rng.integers(2, 6), rng.integers(2, 40), rng.integers(2, 7)
        codes = rng.integers(0, k, size=(coders, items))
        codes = np.where(rng.random((coders, items)) < rng.choice([0.0, 0.2, 0.5]), -1, codes)
        for level in LEVELS:
            assert same(krippendorff_alpha(codes.tolist(), k, level), reference_alpha(codes, k, level)), (codes, level)
            checked += 1
    assert checked == 450


def random_study(rng, n=40, coders=3, labels=("a", "b", "c"), missing=0.1, unused="d"):
    gold = [str(g) for g in rng.choice(labels, n)]
    codings = {}
    for j in range(coders):
        codings[f"coder{j}"] = [None if rng.random() < missing else g if rng.random() < 0.65 else str(rng.choice(labels))
                                for g in gold]
    return gold, codings, list(labels) + ([unused] if unused else [])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    gold, codings, labels = random_study(rng)
    a = pg.agreement(codings, gold, labels=labels, ci=None)
    assert [s.coder for s in a.gold] == list(codings) and a.labels == labels and a.items == len(gold)
    for s in a.gold:
        have = [i for i, v in enumerate(codings[s.coder]) if v is not None]
        y, p = [gold[i] for i in have], [codings[s.coder][i] for i in have]
        assert s.n == len(have) and s.missing == len(gold) - len(have) and a.missing[s.coder] == s.missing
        assert s.accuracy.value == pytest.approx(metrics.accuracy_score(y, p))
        prec, rec, f1, sup = metrics.precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
        assert [c.label for c in s.per_class] == labels
        assert [c.precision for c in s.per_class] == pytest.approx(prec.tolist())
        assert [c.recall for c in s.per_class] == pytest.approx(rec.tolist())
        assert [c.f1 for c in s.per_class] == pytest.approx(f1.tolist())
        assert [c.support for c in s.per_class] == sup.tolist()
        assert s.macro_f1.value == pytest.approx(metrics.f1_score(y, p, average="macro", zero_division=0))
        assert s.weighted_f1 == pytest.approx(metrics.f1_score(y, p, average="weighted", zero_division=0))
        assert s.kappa.value == pytest.approx(metrics.cohen_kappa_score(y, p, labels=labels))
        assert s.confusion == metrics.confusion_matrix(y, p, labels=labels).tolist()
        assert s.confusion[-1] == [0, 0, 0, 0] and [row[-1] for row in s.confusion] == [0, 0, 0, 0]  # "d" unused
    for pair in a.pairs:
        both = [i for i in range(len(gold)) if codings[pair.coder_a][i] is not None
                and codings[pair.coder_b][i] is not None]
        x, y = [codings[pair.coder_a][i] for i in both], [codings[pair.coder_b][i] for i in both]
        assert pair.n == len(both)
        assert pair.percent_agreement == pytest.approx(np.mean([u == v for u, v in zip(x, y)]))
        assert pair.kappa.value == pytest.approx(metrics.cohen_kappa_score(x, y, labels=labels))
    assert [(p.coder_a, p.coder_b) for p in a.pairs] == [("coder0", "coder1"), ("coder0", "coder2"),
                                                        ("coder1", "coder2")]
    codes = [[labels.index(v) if v is not None else -1 for v in codings[c]] for c in codings]
    assert same(a.alpha.alpha.value, reference_alpha(codes, len(labels), "nominal"))


def test_bootstrap_intervals_are_a_percentile_bootstrap_of_the_reference_statistics():
    """The fast replicates (confusion matrices) give exactly the intervals that resampling
    items and calling scikit-learn / krippendorff on each replicate gives."""
    rng = np.random.default_rng(3)
    gold, codings, labels = random_study(rng, n=30, coders=2)
    n_boot, seed, ci = 60, 11, 0.9
    a = pg.agreement(codings, gold, labels=labels, ci=ci, seed=seed, n_boot=n_boot, level="ordinal")
    draws = np.random.default_rng(seed).integers(0, len(gold), size=(n_boot, len(gold)))
    coders = list(codings)
    reps = {k: [] for k in ("acc", "f1", "kappa", "pair", "alpha")}
    for d in draws:
        y = [gold[i] for i in d]
        c0 = [codings[coders[0]][i] for i in d]
        c1 = [codings[coders[1]][i] for i in d]
        have = [j for j, v in enumerate(c0) if v is not None]
        yy, pp = [y[j] for j in have], [c0[j] for j in have]
        reps["acc"].append(metrics.accuracy_score(yy, pp))
        reps["f1"].append(metrics.f1_score(yy, pp, average="macro", zero_division=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            reps["kappa"].append(metrics.cohen_kappa_score(yy, pp, labels=labels))
        both = [j for j in range(len(d)) if c0[j] is not None and c1[j] is not None]
        reps["pair"].append(metrics.cohen_kappa_score([c0[j] for j in both], [c1[j] for j in both], labels=labels))
        codes = [[labels.index(v) if v is not None else -1 for v in c] for c in (c0, c1)]
        reps["alpha"].append(reference_alpha(codes, len(labels), "ordinal"))
    q = [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]

    def interval(values):
        v = np.asarray(values, dtype=float)
        return pytest.approx(np.percentile(v[np.isfinite(v)], q).tolist(), rel=1e-9, abs=1e-12)

    s = a.gold[0]
    assert [s.accuracy.low, s.accuracy.high] == interval(reps["acc"])
    assert [s.macro_f1.low, s.macro_f1.high] == interval(reps["f1"])
    assert [s.kappa.low, s.kappa.high] == interval(reps["kappa"])
    assert [a.pairs[0].kappa.low, a.pairs[0].kappa.high] == interval(reps["pair"])
    assert [a.alpha.alpha.low, a.alpha.alpha.high] == interval(reps["alpha"])
    assert s.accuracy.low < s.accuracy.value < s.accuracy.high


def test_bootstrap_intervals_are_reproducible_by_seed():
    gold, codings, labels = random_study(np.random.default_rng(5))
    a, b = pg.agreement(codings, gold, seed=42), pg.agreement(codings, gold, seed=42)
    c = pg.agreement(codings, gold, seed=43)
    assert a.to_dict() == b.to_dict()
    assert a.gold[0].accuracy.value == c.gold[0].accuracy.value  # same estimates...
    assert (a.gold[0].accuracy.low, a.alpha.alpha.high) != (c.gold[0].accuracy.low, c.alpha.alpha.high)  # ...other draws


def test_long_tables_mappings_and_data_frames_give_the_same_agreement():
    gold, codings, labels = random_study(np.random.default_rng(9), missing=0.0, unused=None)
    rows = [{"item": f"t{i}", "coder": c, "label": v, "truth": gold[i]} for c, vs in codings.items()
            for i, v in enumerate(vs)]
    by_mapping = pg.agreement(codings, gold, labels=labels).to_dict()
    by_rows = pg.agreement(rows, "truth", labels=labels).to_dict()
    by_item = pg.agreement(rows, {f"t{i}": g for i, g in enumerate(gold)}, labels=labels).to_dict()
    assert by_mapping == by_rows == by_item
    pd = import_extra("pandas", "test")  # pulled in by the test extra (ray[data])
    frame = pd.DataFrame(rows).rename(columns={"item": "doc", "coder": "annotator", "label": "code"})
    assert pg.agreement(frame, "truth", labels=labels, item="doc", coder="annotator", label="code").to_dict() == by_rows


def test_missing_labels_are_counted_and_left_out_not_dropped_silently():
    gold = ["a", "b", "a", "b", "a"]
    codings = {"x": ["a", None, "a", "", float("nan")], "y": ["a", "b", "b", "b", "a"]}
    a = pg.agreement(codings, gold, ci=None)
    assert a.missing == {"x": 3, "y": 0}
    x = a.gold[0]
    assert (x.n, x.missing, x.accuracy.value) == (2, 3, 1.0)
    assert a.pairs[0].n == 2 and a.alpha.items == 5 - 3 and a.alpha.values == 4
    assert "missing labels: x 3" in a.report()


def test_a_single_class_gives_nan_kappa_and_alpha_reported_as_null():
    a = pg.agreement({"x": ["a"] * 6, "y": ["a"] * 6}, ["a"] * 6, labels=["a", "b"], n_boot=50)
    assert a.gold[0].accuracy.value == 1.0 and math.isnan(a.gold[0].kappa.value) and math.isnan(a.alpha.alpha.value)
    d = json.loads(json.dumps(a.to_dict(), allow_nan=False))  # strict JSON: NaN is null
    assert d["gold"][0]["kappa"]["value"] is None and d["alpha"]["alpha"]["value"] is None


def test_to_dict_tables_report_and_plot(tmp_path):
    import_extra("matplotlib", "plot")
    gold, codings, labels = random_study(np.random.default_rng(2))
    a = pg.agreement(codings, gold, labels=labels)
    d = json.loads(json.dumps(a.to_dict(), allow_nan=False))
    assert d["labels"] == labels and len(d["gold"]) == 3 and len(d["pairs"]) == 3 and d["alpha"]["level"] == "nominal"
    t = a.tables()
    assert [r["coder"] for r in t["coders"]] == list(codings)
    assert len(t["per_class"]) == 3 * len(labels) and len(t["confusion"]) == 3 * len(labels) ** 2
    assert sum(r["count"] for r in t["confusion"] if r["coder"] == "coder0") == a.gold[0].n
    report = a.report()
    assert "against gold" in report and "Krippendorff's alpha (nominal)" in report and "coder2" in report
    path = tmp_path / "agreement.png"
    fig = a.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(fig.axes) >= 4  # 3 heatmaps, kappa matrix (+bar)


def test_ordinal_and_interval_levels_use_the_label_order():
    codes = {"x": ["1", "2", "3", "3", "1"], "y": ["1", "3", "3", "2", "1"]}
    for level in ("ordinal", "interval"):
        a = pg.agreement(codes, labels=["1", "2", "3"], level=level, ci=None)
        ref = reference_alpha([[int(v) - 1 for v in codes[c]] for c in codes], 3, level)
        assert same(a.alpha.alpha.value, ref)
    with pytest.raises(pg.ParamError, match="needs labels"):
        pg.agreement(codes, level="ordinal")


@pytest.mark.parametrize("call, message", [
    (lambda: pg.agreement({"x": ["a", "b"], "y": ["a", "a"]}, ["a", "zebra"], labels=["a", "b"]),
     "gold label 'zebra'"),
    (lambda: pg.agreement({"x": ["a", "b"], "y": ["a", "a"]}, ["a", None]), "gold has no label for 1 of 2"),
    (lambda: pg.agreement({"x": ["a", "b"], "y": ["a", "a"]}, ["a"]), "gold has 1 labels for 2 items"),
    (lambda: pg.agreement({"x": ["a", "b"]}), "one coder .* and no gold"),
    (lambda: pg.agreement({"x": ["a", "q"], "y": ["a", "a"]}, labels=["a", "b"]), "label 'q'"),
    (lambda: pg.agreement({"x": ["a", "b"], "y": ["a"]}), "has 1 labels"),
    (lambda: pg.agreement([{"item": 1, "coder": "x", "label": "a"}, {"item": 1, "coder": "x", "label": "b"}]),
     "labels item 1 twice"),
    (lambda: pg.agreement([{"item": 1, "label": "a"}]), "no 'coder' column"),
    (lambda: pg.agreement({"x": ["a"], "y": ["a"]}, ci=1.5), "ci=1.5"),
    (lambda: pg.agreement({"x": ["a"], "y": ["a"]}, level="ratio"), "level='ratio'"),
    (lambda: krippendorff_alpha([[0, 1, 1]], 2), "two coders or more"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(pg.ParamError, match=message):
        call()
