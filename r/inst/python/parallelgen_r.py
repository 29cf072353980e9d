"""Glue between the R package parallelgen and the Python package parallel_gen.

Every call from R goes through call(): a Python exception comes back as data (its class
names, its message, the exception and its formatted traceback) instead of being raised,
so R can signal a condition with the original message under every reticulate version.
Results are handed to R column by column (one conversion per column, not per prompt).
"""

import dataclasses
import traceback


def call(f, args, kwargs):
    """[None, f(*args, **kwargs)], or [[class names, message, exception, traceback], None]."""
    try:
        return [None, f(*list(args or ()), **dict(kwargs or {}))]
    except Exception as e:  # KeyboardInterrupt and SystemExit go through to R
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        classes = [c.__name__ for c in type(e).__mro__ if c is not object]
        # Drop the frames (they would keep the call's locals, a Model among them, alive).
        return [[classes, str(e), e.with_traceback(None), tb], None]


def _r_str(s):
    # R strings cannot hold NUL characters.
    return s.replace("\x00", "\ufffd") if "\x00" in s else s


def columns(result):
    """A BatchResult as a dict of equal-length lists: one entry per output (sample) of
    every completion, in prompt order, then sample order. "" stands for None in
    stop_reason and error (neither is ever an empty string)."""
    cols = {k: [] for k in ("index", "sample", "prompt", "text", "finish_reason", "stop_reason",
                            "prompt_tokens", "completion_tokens", "error")}
    for c in result:
        for j, o in enumerate(c.outputs):
            cols["index"].append(int(c.index))
            cols["sample"].append(j)
            cols["prompt"].append(_r_str(c.prompt))
            cols["text"].append(_r_str(o.text))
            cols["finish_reason"].append(str(o.finish_reason))
            cols["stop_reason"].append("" if o.stop_reason is None else _r_str(str(o.stop_reason)))
            cols["prompt_tokens"].append(int(c.prompt_tokens))
            cols["completion_tokens"].append(len(o.token_ids))
            cols["error"].append(_r_str(o.error or ""))
    return cols


def logprobs(result):
    """Per output (in the order of columns()), its log-probabilities as flat columns, one
    entry per (position, rank): rank 0 is the generated token, ranks 1.. the most likely
    tokens at that position, best first. Empty for an output without logprobs."""
    out = []
    for c in result:
        for o in c.outputs:
            cols = {k: [] for k in ("position", "rank", "token_id", "token", "logprob")}
            for pos, t in enumerate(o.logprobs or ()):
                for rank, lp in enumerate([t] + list(t.top)):
                    cols["position"].append(pos)
                    cols["rank"].append(rank)
                    cols["token_id"].append(int(lp.token_id))
                    cols["token"].append(_r_str(lp.token))
                    cols["logprob"].append(float(lp.logprob))
            out.append(cols)
    return out


def tool_calls(result):
    """Per output (in the order of columns()), its content ("" for None) and its tool
    calls as flat columns: id, name, arguments (JSON text)."""
    out = []
    for c in result:
        for o in c.outputs:
            calls = o.tool_calls or ()
            out.append({"content": _r_str(o.content or ""),
                        "id": [x.id for x in calls], "name": [x.name for x in calls],
                        "arguments": [_r_str(x.arguments) for x in calls]})
    return out


def stats(result):
    """result.stats (a BatchStats dataclass) as a dict."""
    return dataclasses.asdict(result.stats)


def job_summary(summary):
    """A JobSummary as a dict of its fields, tokens_per_second and rows_per_second included."""
    return dict(dataclasses.asdict(summary), tokens_per_second=summary.tokens_per_second,
                rows_per_second=summary.rows_per_second)


def classifications(result):
    """A Classifications as columns: "label" and "error" ("" stands for None; neither is
    ever an empty string), and "probs", one list per label (in result.labels' order) of
    each text's probability (NaN for a text that failed)."""
    return {
        "label": ["" if c.label is None else _r_str(c.label) for c in result],
        "error": ["" if c.error is None else _r_str(c.error) for c in result],
        "probs": [result.probs[:, j].tolist() for j in range(len(result.labels))],
    }


def _column(values):
    return [_r_str(v) if isinstance(v, str) else v for v in values]


def _frame(records, columns=None):
    """Records as {column: list}; None stays None (NA in R)."""
    columns = columns or (list(records[0]) if records else [])
    return {c: _column([r.get(c) for r in records]) for c in columns}


def agreement_result(a):
    """An Agreement as one table per section (each {column: list}), its report and itself."""
    return {"tables": {name: _frame(rows) for name, rows in a.tables().items()}, "report": _r_str(a.report()),
            "labels": list(a.labels), "coders": list(a.coders), "py": a}


def codings_records(items, coders, labels, gold=None):
    """Long-table columns from R as records for parallel_gen.agreement ("" is a missing label)."""
    rows = []
    for i, (item, coder, label) in enumerate(zip(items, coders, labels)):
        row = {"item": item, "coder": coder, "label": None if label in ("", None) else label}
        if gold is not None:
            row["gold"] = None if gold[i] in ("", None) else gold[i]
        rows.append(row)
    return rows


def comparison_result(c):
    """A Comparison's long table as columns, and its agreement (None without one)."""
    return {"codings": _frame(c.rows()), "agreement": None if c.agreement is None else agreement_result(c.agreement)}
