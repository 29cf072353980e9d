"""chat_parallel: many conversations, formatted with the model's chat template, one batch."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as _SequenceABC
from typing import Any, List, Optional, Sequence, Tuple

from .errors import ParamTypeError
from .generate import ModelLike, open_model, run_batch, sized_to
from .inputs import OncePerModel, Params, PreparedPrompt, param_list, prepare_all, reject_unordered
from .model import Model
from .progress import make_progress
from .results import BatchResult
from .templates import ChatTemplate, Message

Conversation = Sequence[Message]


def chat_parallel(
    model: ModelLike,
    conversations: Sequence[Conversation],
    params: Params = None,
    *,
    chat_template: Optional[str] = None,
    progress: Optional[bool] = None,
    **overrides: Any,
) -> BatchResult:
    """Answers every conversation, decoding them together in one batch.

    Each conversation is a list of ``{"role": ..., "content": ...}`` messages (roles
    such as "system", "user", "assistant"). It is formatted with the model's own chat
    template, ending with the opener of the assistant's turn, and generation stops at
    the template's end-of-turn marker, so the answers hold no template markup.

    Args:
        model: a :class:`Model`, a path to a .gguf file, or a ``llama_cpp.Llama``.
        conversations: a sequence of conversations (wrap a single one in a list).
        params: one :class:`SamplingParams` for all conversations, or one per conversation.
        chat_template: None for the model's template; else Jinja template text or a
            llama.cpp built-in name such as "chatml" (needed for a model without one).
        progress: a progress bar on stderr; None shows it when stderr is a terminal.
        **overrides: any SamplingParams field, applied on top of ``params``.

    Returns:
        A :class:`BatchResult` in conversation order; ``Completion.prompt`` is the
        formatted prompt.

    Raises:
        TypeError, ValueError: malformed conversations (the message names the index),
            bad params, or no usable chat template; all before any generation.
        FileNotFoundError, ModelLoadError, GenerationError: as for generate_parallel.
    """
    convs = conversation_list(conversations)
    per_conv = param_list(params, overrides, len(convs))
    bar = make_progress(progress, len(convs))  # checks progress before the model loads

    def render(m: Model) -> Tuple[ChatTemplate, List[PreparedPrompt]]:
        template = ChatTemplate(m, chat_template)
        return template, prepare_all(m, _render_all(template, convs))

    rendered = OncePerModel(render)
    # A Model opened here gets a context sized to these conversations, rendered once.
    with open_model(model, sized_to(lambda m: rendered(m)[1], [p.max_tokens for p in per_conv])) as m:
        template, prompts = rendered(m)
        per_conv = [template.add_stops(p) for p in per_conv]
        with bar as on_step:
            return run_batch(m, prompts, per_conv, on_step=on_step)


def apply_chat_template(
    model: Model,
    messages: Conversation,
    *,
    chat_template: Optional[str] = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text chat_parallel would build for one conversation."""
    template = ChatTemplate(model, chat_template)
    return template.render(conversation_list([messages])[0], add_generation_prompt)


def conversation(user: str, system: Optional[str] = None) -> List[Message]:
    """The conversation of one plain text: a user turn, after a system turn when given."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": user}]


def chat_mode(chat: bool, system: Optional[str], chat_template: Optional[str]) -> bool:
    """Whether plain texts go through a chat template: asked for, or implied by a system
    message or a chat template (neither means anything to a plain prompt)."""
    if not isinstance(chat, bool):
        raise ParamTypeError(f"chat must be a bool, got {type(chat).__name__}", "chat")
    if system is not None and not isinstance(system, str):
        raise ParamTypeError(f"system must be a str, got {type(system).__name__}", "system")
    return chat or system is not None or chat_template is not None


def _render_all(template: ChatTemplate, convs: List[List[Message]]) -> List[str]:
    prompts = []
    for i, conv in enumerate(convs):
        try:
            prompts.append(template.render(conv))
        except ValueError as e:
            raise ValueError(f"conversations[{i}]: {e}") from None
    return prompts


def conversation_list(conversations: Any) -> List[List[Message]]:
    """Checks the shape of every message; messages are copied into plain dicts."""
    if isinstance(conversations, (str, bytes, Mapping)):
        raise TypeError(f"conversations must be a sequence of conversations (lists of messages), got "
                        f"{type(conversations).__name__}")
    reject_unordered("conversations", conversations)
    try:
        items = list(conversations)
    except TypeError:
        raise TypeError(f"conversations must be a sequence of conversations, got "
                        f"{type(conversations).__name__}") from None
    if items and all(isinstance(x, Mapping) for x in items):
        raise TypeError("conversations must be a list of conversations, each a list of messages; got a single "
                        "conversation: wrap it in a list, chat_parallel(model, [messages])")
    out = []
    for i, conv in enumerate(items):
        if isinstance(conv, (str, bytes, Mapping)) or not isinstance(conv, _SequenceABC):
            raise TypeError(f"conversations[{i}] must be a list of messages, got {type(conv).__name__}")
        if len(conv) == 0:
            raise ValueError(f"conversations[{i}] is empty: it needs at least one message")
        out.append([check_message(f"conversations[{i}][{j}]", msg) for j, msg in enumerate(conv)])
    return out


def check_message(where: str, msg: Any) -> Message:
    """``msg`` as a plain dict, after checking it is a message; errors name ``where``."""
    if not isinstance(msg, Mapping):
        raise TypeError(f"{where} must be a dict with 'role' and 'content', got {type(msg).__name__}")
    for key in ("role", "content"):
        if key not in msg:
            raise ValueError(f"{where} has no {key!r}")
        if not isinstance(msg[key], str):
            raise TypeError(f"{where}[{key!r}] must be a str, got {type(msg[key]).__name__}")
    if not msg["role"].strip():
        raise ValueError(f"{where}['role'] is empty")
    return dict(msg)
