"""ToolPlan: a chat template and a call's tools together: the prompt (tools rendered by the
template, or described by a system block), the constraint on the reply, and the reply
read back as text and typed tool calls. chat_parallel, the file job and the server share it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from ..results import Output, ToolCall
from .formats import Constraint, ToolFormat
from .spec import ChoiceMode, ToolRequest

if TYPE_CHECKING:
    from ..model import Model
    from ..params import SamplingParams
    from ..templates import ChatTemplate, Message


class ToolPlan:
    """How one call's conversations are formatted and answered.

    Args:
        template: the chat template.
        request: the tools and tool_choice (None: no tools; the plan then renders as the
            template does and leaves replies as they are).

    Raises:
        ValueError: the tools' grammar cannot be built.
    """

    def __init__(self, template: "ChatTemplate", request: Optional[ToolRequest]) -> None:
        self.template = template
        self.request = request
        self.format: Optional[ToolFormat] = template.tool_format if request is not None else None
        self.constraint: Optional[Constraint] = None
        if request is not None and self.format is not None:
            try:
                self.constraint = self.format.constraint(request)
            except ValueError as e:
                raise ValueError(f"tools: {e}") from None

    def render(self, messages: Sequence["Message"], add_generation_prompt: bool = True) -> str:
        """The prompt for validated ``messages`` (see :func:`parallel_gen.chat.checked_conversation`)."""
        r, fmt = self.request, self.format
        if r is None or fmt is None or r.mode is ChoiceMode.NONE:
            return self.template.render(messages, add_generation_prompt)
        if fmt.native:
            return self.template.render(messages, add_generation_prompt, tools=[t.to_openai() for t in r.tools])
        block = fmt.system_block(r)  # type: ignore[attr-defined]
        return self.template.render(_with_instructions(messages, block, self.template.caps.system_role),
                                    add_generation_prompt)

    def params(self, p: "SamplingParams") -> "SamplingParams":
        """``p`` constrained to the reply's shape (stop markers are the template's business:
        :meth:`ChatTemplate.add_stops`)."""
        if self.constraint is None:
            return p
        if p.compiled_grammar is not None:
            mode = self.request.mode.value  # type: ignore[union-attr]
            raise ValueError(f"tools cannot be combined with grammar, json_schema or choices: with tool_choice "
                             f"{mode!r} the tool calls' grammar constrains the output (tool_choice='none' leaves it "
                             "free)")
        return p.replace(grammar=self.constraint.grammar, grammar_triggers=self.constraint.triggers)

    def streamable(self, text: str) -> int:
        """How much of ``text``, a reply so far, is surely content, not a call: a stream
        sends that much as content and holds back the rest until the reply is read. All
        of it without tools; none where the whole reply may be a call (tool_choice
        "required" or named, the generic JSON reply, formats without a start marker);
        under "auto", the text before a call's start marker (or what may begin one)."""
        return self.stream_split(text)[0]

    def stream_split(self, text: str) -> "Tuple[int, bool]":
        """:meth:`streamable`, and whether nothing after it will ever stream (a call
        started, or the whole reply may be one): a stream then stops looking."""
        r, fmt = self.request, self.format
        if r is None or fmt is None or r.mode is ChoiceMode.NONE:
            return len(text), False
        marker = fmt.start_marker if fmt.native and r.mode is ChoiceMode.AUTO else None
        if marker is None:
            return 0, True
        at = text.find(marker)
        if at >= 0:
            return at, True
        held = next((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:k])), 0)
        return len(text) - held, False

    def read(self, model: "Model", output: Output) -> Output:
        """``output`` with its tool calls and content read (unchanged without tools)."""
        if self.request is None or self.format is None or output.finish_reason == "error":
            return output
        if self.request.mode is ChoiceMode.NONE:
            return dataclasses.replace(output, tool_calls=[], content=output.text)
        reply = self.format.parse(_reply_text(model, output))
        cut = output.finish_reason == "length"
        if not reply.calls or (not reply.complete and not cut):
            # No call read whole, or the model ended on one it did not write whole (possible
            # only unconstrained): the text stands as it is.
            return dataclasses.replace(output, tool_calls=[], content=output.text if reply.started else reply.content)
        # Cut short ("length" stays): the calls read whole before the cut, none half-read.
        calls = [ToolCall(self.format.new_id(), c.name, c.arguments) for c in reply.calls]
        return dataclasses.replace(output, tool_calls=calls, content=reply.content,
                                   finish_reason="length" if cut else "tool_calls")


def _with_instructions(messages: Sequence["Message"], block: str, system_role: bool) -> List[Dict[str, Any]]:
    """``messages`` with ``block`` ending the system message (one is added first if none);
    for a template refusing system messages, starting the first user message instead."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        return out
    if system_role:
        return [{"role": "system", "content": block}] + out
    first = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
    if first is None:
        return out
    out[first]["content"] = f"{block}\n\n{out[first]['content']}"
    return out


def _reply_text(model: "Model", output: Output) -> str:
    """The reply as the format's parser needs it: ``text``, unless the model wrote
    special tokens (Mistral's [TOOL_CALLS], ...), which ``text`` leaves out."""
    ids = output.token_ids
    if isinstance(output.stop_reason, int) and ids and ids[-1] == output.stop_reason:
        ids = ids[:-1]  # the stop token that ended it
    special = model.detokenize(ids, render_special=True)
    if special == output.text or special == model.detokenize(ids):  # (the first: one detokenize, mostly)
        return output.text
    if isinstance(output.stop_reason, str) and output.stop_reason in special:
        special = special[:special.index(output.stop_reason)]
    return special
