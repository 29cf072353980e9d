"""Label probabilities on Ray Data: BatchClassifier (the map_batches class) and classify().

The rows are those of ``parallel-gen classify``: the input's columns, then ``row`` (null:
a Dataset has no row numbers), ``label``, ``p_<label>`` per label and ``error``; each
actor holds one Model and runs the classify file job's own per-row code
(jobs.classify_job, through BatchRunner), so a row's probabilities are those
``pg.classify`` gives its text.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import ray.data

from ..classification import Template
from ..config import model_config
from ..jobs.classify_job import classify_job, text_columns
from .batch import BatchRunner
from .dataset import map_with_actors


class BatchClassifier(BatchRunner):
    """BatchRunner of the classify job, for ``ray.data.Dataset.map_batches(...,
    batch_format="pyarrow")``: each actor opens one Model (see BatchRunner); without
    ``n_ctx`` in ``model_options`` the context is sized from the actor's first batch and
    the labels (a later text that does not fit gets an error naming n_ctx).

    Args:
        model: GGUF path readable on every node (None: the default model).
        labels, template, chat, system, normalize, chat_template: as for
            :func:`parallel_gen.classify` (``system`` and ``chat_template`` imply
            ``chat``, as in the classify file job).
        text_column: the column holding the text.
        model_options: other Model keywords (ModelConfig fields: n_parallel, n_ctx, ...).

    Output columns: the input's (one named like an output column is carried as
    ``input_<name>``), then ``row`` (null), ``label`` (the most likely), ``p_<label>``
    (float64, one per label in the order given; they sum to 1) and ``error``. A row that
    cannot be classified (no text, a text too long) gets ``error`` and null label and
    probabilities; the batch never fails for one row.
    """

    def __init__(self, model: Optional[str] = None, *, labels: Sequence[str], text_column: str = "text",
                 template: Optional[Template] = None, chat: bool = False, system: Optional[str] = None,
                 normalize: str = "sum", chat_template: Optional[str] = None,
                 model_options: Optional[Mapping[str, Any]] = None) -> None:
        job = classify_job(labels, template=template, chat=chat, system=system, normalize=normalize,
                           chat_template=chat_template)
        super().__init__(job, model, text_columns(text_column), model_options)


def classify(ds: "ray.data.Dataset", labels: Sequence[str], model: Union[str, "os.PathLike[str]", None] = None, *,
             text_column: str = "text", template: Optional[Template] = None, chat: bool = False,
             system: Optional[str] = None, normalize: str = "sum", chat_template: Optional[str] = None,
             actors: int = 1, cpus_per_actor: float = 1, gpus_per_actor: float = 0,
             batch_size: Optional[int] = None, model_options: Optional[Mapping[str, Any]] = None
             ) -> "ray.data.Dataset":
    """The rows of ``ds``, each with the label probabilities of its ``text_column`` added
    (lazy, like every Dataset transform).

    Args:
        ds: a Dataset with a ``text_column`` (str); other columns are carried unchanged.
        labels, template, chat, system, normalize, chat_template: as for
            :func:`parallel_gen.classify`.
        model, actors, cpus_per_actor, gpus_per_actor, batch_size, model_options: as for
            :func:`parallel_gen.ray.generate`.

    Returns:
        The Dataset of output rows; see :class:`BatchClassifier` for the columns. Rows
        come back in any order unless the Dataset preserves order: join on an id.

    Raises:
        TypeError, ValueError: bad labels, template or arguments, at the call.
    """
    if not isinstance(text_column, str) or not text_column:
        raise ValueError(f"text_column={text_column!r}: must be a non-empty str")
    job = classify_job(labels, template=template, chat=chat, system=system, normalize=normalize,
                       chat_template=chat_template)  # bad labels or template: here, not in every actor
    path = None if model is None else os.fspath(model)
    return map_with_actors(ds, BatchClassifier, (path,),
                           dict(labels=list(job.options.labels), text_column=text_column, template=template, chat=chat,
                                system=system, normalize=normalize, chat_template=chat_template,
                                model_options=dict(model_options or {})),
                           actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                           batch_size=batch_size, n_parallel=model_config(None, model_options).n_parallel)
