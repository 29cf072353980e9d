"""compare: several models x prompt variants classify the same texts; their codings as
one long table, and their agreement with gold labels and with each other.

Each coder is a model crossed with a template. A model is opened once (sized to every
template's prompts) and runs one :func:`parallel_gen.classify` call per template, then
is closed before the next one opens: k models x t templates cost k x t classify calls
and nothing more (benchmarks/compare.py measures it).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ParamError, ParamTypeError

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..core.inputs import ScoringPrompt
    from ..jobs.sizing import SizedContext
    from ..model import Model
    from .agreement import Agreement

DEFAULT_TEMPLATE_NAME = "default"
ModelSpec = Union[str, "os.PathLike[str]", "Model", Tuple[Union[str, "os.PathLike[str]"], "ModelConfig"]]


@dataclass(frozen=True)
class Coder:
    """A model crossed with a template."""

    name: str
    """``model`` alone with the default template only, else ``model/template``."""
    model: str
    template: str


@dataclass(frozen=True)
class Coding:
    """One coder's label for one item (a row of the long table)."""

    item: int
    """The text's position in ``texts``."""
    coder: str
    model: str
    template: str
    label: Optional[str]
    """None when ``error`` is set."""
    probs: Dict[str, float]
    """label -> probability, in label order (NaN on error)."""
    error: Optional[str] = None


class Comparison:
    """What :func:`compare` produced: ``codings`` (the long table), ``coders``, ``labels``,
    ``gold``, and ``agreement`` (None with one coder and no gold)."""

    def __init__(self, texts: List[str], labels: List[str], coders: List[Coder], codings: List[Coding],
                 gold: Optional[List[str]], agreement: "Optional[Agreement]") -> None:
        self.texts = texts
        self.labels = labels
        self.coders = coders
        self.codings = codings
        self.gold = gold
        self.agreement = agreement

    def rows(self) -> List[Dict[str, Any]]:
        """The long table as records: item, coder, model, template, (gold,) label,
        ``p_<label>`` per label, error; NaN probabilities of a failed row as None."""
        out = []
        for c in self.codings:
            rec: Dict[str, Any] = {"item": c.item, "coder": c.coder, "model": c.model, "template": c.template}
            if self.gold is not None:
                rec["gold"] = self.gold[c.item]
            rec["label"] = c.label
            rec.update({f"p_{lab}": (None if math.isnan(p) else p) for lab, p in c.probs.items()})
            rec["error"] = c.error
            out.append(rec)
        return out

    def wide(self) -> Dict[str, List[Optional[str]]]:
        """coder -> its labels in item order (None where it failed)."""
        out: Dict[str, List[Optional[str]]] = {c.name: [None] * len(self.texts) for c in self.coders}
        for c in self.codings:
            out[c.coder][c.item] = c.label
        return out

    def to_pandas(self) -> Any:
        """The long table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def agreement_input(self) -> Tuple[List[Dict[str, Any]], Optional[List[str]]]:
        """(item/coder/label records, gold in item order), for :func:`parallel_gen.agreement`."""
        return [{"item": c.item, "coder": c.coder, "label": c.label} for c in self.codings], self.gold

    def __repr__(self) -> str:
        failed = sum(c.error is not None for c in self.codings)
        return (f"Comparison({len(self.texts)} texts x {len(self.coders)} coders, labels={self.labels!r}, "
                f"failed={failed}, gold={'yes' if self.gold is not None else 'no'})")


def compare(models: Any, texts: Union[str, Sequence[str]], labels: Sequence[str], gold: Optional[Sequence[str]] = None,
            templates: Optional[Mapping[str, Any]] = None, *, model_options: Optional[Mapping[str, Any]] = None,
            level: str = "nominal", ci: Optional[float] = 0.95, seed: int = 0, n_boot: int = 1000,
            progress: Optional[bool] = None,
            **classify_options: Any) -> Comparison:
    """Classifies ``texts`` with every model x template and compares the codings.

    Args:
        models: a model or a list of them, or a mapping name -> model; a model is a
            path to a .gguf file, an open :class:`Model`, or a (path, ModelConfig) pair.
            Models given as paths are opened one at a time (sized to the texts unless
            ``model_options`` give ``n_ctx``) and closed after their templates ran.
        texts: the texts (one str: one text).
        labels: the label set, as for :func:`parallel_gen.classify`.
        gold: the true label of each text (optional): every text needs one, from ``labels``.
        templates: name -> template (as ``classify``'s ``template``); default: one,
            named "default", classify's own.
        model_options: ModelConfig fields for models given as paths.
        level, ci, seed, n_boot: :func:`parallel_gen.agreement`'s.
        progress: a progress bar per classify call.
        **classify_options: ``chat``, ``system``, ``normalize``, ``chat_template``, as for
            :func:`parallel_gen.classify`.

    Returns:
        :class:`Comparison`: the long table (``codings``, ``rows()``, ``to_pandas()``),
        and its ``agreement`` (with gold, or with two coders or more).

    Raises:
        ParamError, ParamTypeError: bad models, templates, labels, gold (a label not in
            ``labels``, a text without one) or options, before any model opens.
    """
    from ..classification import classify_options as check_classify
    from ..core.inputs import prompt_list
    from .agreement import require_sklearn, check_gold

    text_list = prompt_list(texts)
    label_list = check_classify(labels).labels
    bad = set(classify_options) - {"chat", "system", "normalize", "chat_template"}
    if bad:
        raise ParamTypeError(f"compare() got unexpected argument(s) {sorted(bad)}", sorted(bad)[0])
    variants = template_variants(templates)
    for name, t in variants.items():
        try:
            check_classify(label_list, template=t, **classify_options)
        except (TypeError, ValueError) as e:
            raise type(e)(f"templates[{name!r}]: {e}") from None
    specs = _models(models)
    coders = [Coder(m if templates is None else f"{m}/{t}", m, t) for m in specs for t in variants]
    gold_list = None if gold is None else check_gold(gold, label_list, len(text_list))
    if gold_list is not None or len(coders) >= 2:
        require_sklearn()  # agreement needs it: say so before any work
    codings: List[Coding] = []
    for model_name, spec in specs.items():
        with open_for_templates(spec, model_options, text_list, label_list, variants, classify_options) as opened:
            for template_name, template in variants.items():
                coder = next(c for c in coders if c.model == model_name and c.template == template_name)
                codings += _codings(opened, coder, text_list, label_list, template, progress, classify_options)
    agreement = None
    if gold_list is not None or len(coders) >= 2:
        from .agreement import agreement as agree

        result = Comparison(text_list, label_list, coders, codings, gold_list, None)
        agreement = agree(result, labels=label_list, level=level, ci=ci, seed=seed, n_boot=n_boot)
    return Comparison(text_list, label_list, coders, codings, gold_list, agreement)


def _codings(opened: TemplatesModel, coder: Coder, texts: List[str], labels: List[str], template: Any,
             progress: Optional[bool], options: Mapping[str, Any]) -> List[Coding]:
    from ..classification import classify_options, classify_texts

    sized = opened.sized.get(coder.template)
    result = classify_texts(opened.model, texts, classify_options(labels, template=template, **options),
                            known=None if sized is None else sized.take, progress=progress, request_id=coder.name)
    return [Coding(i, coder.name, coder.model, coder.template, c.label, dict(c.probs), c.error)
            for i, c in enumerate(result)]


def template_variants(templates: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if templates is None:
        return {DEFAULT_TEMPLATE_NAME: None}
    if not isinstance(templates, Mapping):
        raise ParamTypeError(f"templates must be a mapping name -> template, got {type(templates).__name__}",
                             "templates")
    if not templates:
        raise ParamError("templates is empty: give at least one, or None for classify's default", "templates")
    for name in templates:
        if not isinstance(name, str) or not name:
            raise ParamTypeError(f"a template's name must be a non-empty str, got {name!r}", "templates")
    return dict(templates)


def _models(models: Any) -> Dict[str, ModelSpec]:
    from ..model import Model

    if isinstance(models, Mapping):
        items = [(str(k), v) for k, v in models.items()]
    else:
        seq = [models] if isinstance(models, (str, os.PathLike, Model, tuple)) else list(models)
        for i, m in enumerate(seq):
            _check_spec(f"models[{i}]", m)
        items = [(model_name(m), m) for m in seq]
    if not items:
        raise ParamError("models is empty: give at least one", "models")
    out: Dict[str, ModelSpec] = {}
    for name, spec in items:
        _check_spec(f"model {name!r}", spec)
        if name in out:
            raise ParamError(f"two models are named {name!r}: give models as a mapping name -> model", "models")
        out[name] = spec
    return out


def model_name(spec: Any) -> str:
    """A model's name in a study: its file name without .gguf."""
    from ..model import Model

    path = spec.path if isinstance(spec, Model) else spec[0] if isinstance(spec, tuple) else spec
    return Path(os.fspath(path)).name.removesuffix(".gguf")


def _check_spec(name: str, spec: Any) -> None:
    from ..config import ModelConfig
    from ..model import Model

    if isinstance(spec, (str, os.PathLike, Model)):
        return
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (str, os.PathLike)) \
            and isinstance(spec[1], ModelConfig):
        return
    raise ParamTypeError(f"{name} must be a path, a Model or a (path, ModelConfig) pair, "
                         f"got {type(spec).__name__}", "models")


@dataclass
class TemplatesModel:
    """The Model a compare's templates run on, and per template name the prompts that
    sizing it tokenized (by text number), for that template's classify run to take: a
    text is tokenized once per template. No entry when the Model was lent or n_ctx given."""

    model: "Model"
    sized: Dict[str, "SizedContext"]


@contextlib.contextmanager
def open_for_templates(spec: ModelSpec, model_options: Optional[Mapping[str, Any]], texts: Sequence[Optional[str]],
                       labels: List[str], templates: Mapping[str, Any],
                       options: Mapping[str, Any]) -> Iterator[TemplatesModel]:
    """The model for ``templates``: an open Model is lent, a path opened once for all of
    them (sized to every template's prompt of every text, unless n_ctx is given) and
    closed after. Texts that are None or make no prompt are left out of the sizing: their
    classify call reports them."""
    from ..classification import Classifier, classify_options
    from ..config import model_config
    from ..jobs.sizing import SizedContext
    from ..model import Model
    from ..scoring import ScoringPromptsFor

    if isinstance(spec, Model):
        yield TemplatesModel(spec, {})
        return
    path, config = spec if isinstance(spec, tuple) else (spec, None)
    config = model_config(config, model_options)
    if config.n_ctx is not None:
        with contextlib.closing(Model(path, config)) as m:
            yield TemplatesModel(m, {})
        return
    built: Dict[str, Dict[int, ScoringPrompt]] = {}

    def prompts(m: Model, name: str, opts: Any) -> List[ScoringPrompt]:
        classifier, out = Classifier(m, opts), built.setdefault(name, {})
        for i, t in enumerate(texts):
            if t is not None:
                try:
                    out[i] = classifier.scoring_prompt(t, f"texts[{i}]")
                except (TypeError, ValueError):
                    pass
        return list(out.values())

    sizers = [ScoringPromptsFor(lambda m, name=name, opts=classify_options(labels, template=t, **options):
                                prompts(m, name, opts))
              for name, t in templates.items()]
    with contextlib.closing(Model.open_sized(path, lambda m: max(s.n_ctx(m) for s in sizers), config)) as m:
        # The whole input was measured: every text fits (no later row to check).
        yield TemplatesModel(m, {name: SizedContext(m.n_ctx, len(texts), checks=False,
                                                    prepared={i: sp.prepared for i, sp in done.items()})
                                 for name, done in built.items()})


__all__ = ["Coder", "Coding", "Comparison", "compare", "model_name"]
