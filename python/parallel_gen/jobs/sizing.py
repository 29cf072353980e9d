"""A job's Model with a context sized to its prompts, when no n_ctx is given.

A streamed job cannot see every prompt before the Model opens: the context is sized
from the first look-ahead rows, with room for prompts twice as long as the longest of
them; a later row that still does not fit becomes an error row that names n_ctx.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..chat import checked_conversation
from ..config import model_config
from ..core.inputs import PreparedPrompt, prepare
from ..memory import n_ctx_for_work, round_cells
from ..model import Model
from ..params import SamplingParams
from ..templates import ChatTemplate
from ..tools import ToolPlan, ToolRequest
from .sources import InputRow

logger = logging.getLogger("parallel_gen")

@dataclass(frozen=True)
class RowNeeds:
    """What a row needs of the context: its conversation (rendered with the job's chat
    template) or its plain prompt, then ``after`` more tokens (max_tokens, a label)."""

    conversation: Optional[List[Any]] = None
    prompt: Optional[str] = None
    after: int = 0


NOTHING = RowNeeds()
"""A row left out of the sizing (it is an error row)."""

Describe = Callable[[Any], RowNeeds]


@dataclass
class SizedContext:
    """The n_ctx a job chose itself, and what it was chosen from."""

    n_ctx: int
    sample_rows: int
    checks: bool = True
    """False when the sample was every row: they all fit by construction."""
    prepared: Dict[int, PreparedPrompt] = field(default_factory=dict)
    """The sample rows' prompts as sizing tokenized them, by row number, until the job
    takes them (:meth:`take`): a row is tokenized once."""

    def take(self, row: int, prompt: str) -> Optional[PreparedPrompt]:
        """Row ``row``'s prompt as sizing tokenized it (None: not in the sample, or another text)."""
        prepared = self.prepared.pop(row, None)
        return prepared if prepared is not None and prepared.text == prompt else None

    def check(self, prompt: PreparedPrompt, params: SamplingParams) -> Optional[str]:
        """Why a prompt does not fit the chosen context (None when it does): a row that
        would otherwise stop early, cut off by the context rather than max_tokens."""
        return self.check_length(len(prompt.tokens), params.max_tokens, f"max_tokens={params.max_tokens}")

    def check_length(self, prompt_tokens: int, after: int, what: str) -> Optional[str]:
        """Why a prompt of ``prompt_tokens`` followed by ``after`` more tokens (``what``
        they are, for the message) does not fit the chosen context; None when it does."""
        need = prompt_tokens + after
        if need <= self.n_ctx or not self.checks:
            return None
        return (f"the prompt has {prompt_tokens} tokens; with {what} it needs {need} tokens of context, "
                f"but n_ctx={self.n_ctx} was sized from the first {self.sample_rows} rows: run it with "
                f"--n-ctx {round_cells(need)} or more (n_ctx in model_options from Python)")


def open_sized_model(path: Union[str, "os.PathLike[str]", None], sample: Sequence[InputRow], describe: Describe,
                     chat_template: Optional[str], *, complete: bool, tools: Optional[ToolRequest] = None,
                     **options: Any) -> Tuple[Model, Optional[SizedContext]]:
    """Opens the model (None: the default one). With ``n_ctx`` in ``options`` as given;
    else sized to the ``sample`` rows (``complete``: they are all the work), their
    conversations rendered with ``chat_template`` and ``tools``. The SizedContext (None
    with ``n_ctx`` given) carries the sample's prompts as tokenized here, for the job."""
    if path is None:
        from ..model_files import default_model_path

        path = default_model_path()
    config = model_config(None, options)
    if config.n_ctx is not None:
        return Model(path, config), None
    chosen: List[SizedContext] = []

    def size(model: Model) -> int:
        longest, max_tokens = 0, 1
        prepared: Dict[int, PreparedPrompt] = {}
        plan: Optional[ToolPlan] = None
        for row in sample:
            needs = describe(row)
            prompt = needs.prompt
            if needs.conversation is not None:
                try:
                    plan = plan or ToolPlan(ChatTemplate(model, chat_template), tools)
                    prompt = plan.render(checked_conversation("messages", needs.conversation))
                except (TypeError, ValueError):
                    continue  # the job reports it as the row's error
            if prompt is None:
                continue
            tokenized = prepared[row.row] = prepare(model, prompt)
            longest = max(longest, len(tokenized.tokens))
            max_tokens = max(max_tokens, needs.after)
        n_ctx = n_ctx_for_work(longest, max_tokens, complete=complete, n_ctx_train=model.n_ctx_train)
        chosen.append(SizedContext(n_ctx, len(sample), checks=not complete, prepared=prepared))
        logger.info("n_ctx %d sized to the work: longest prompt %d tokens%s + max_tokens %d, in %d rows",
                    n_ctx, longest, "" if complete else " (x2 for rows not seen yet)", max_tokens, len(sample))
        return n_ctx

    model = Model.open_sized(path, size, config)
    # A complete sample fits by construction: only a streamed job checks later rows.
    return model, chosen[0]
