"""chat_parallel: many conversations, formatted with the model's chat template, one batch."""

from __future__ import annotations

import json
from collections.abc import Mapping
from collections.abc import Sequence as _SequenceABC
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .errors import ParamTypeError
from .generate import ModelLike, open_model, run_batch, sized_to
from .core.inputs import OncePerModel, Params, PreparedPrompt, param_list, prepare_all, reject_unordered
from .model import Model
from .progress import make_progress
from .results import BatchResult
from .templates import ChatTemplate, Message
from .tools import ToolPlan, tool_request

Conversation = Sequence[Message]


def chat_parallel(
    model: ModelLike,
    conversations: Sequence[Conversation],
    params: Params = None,
    *,
    tools: Optional[Sequence[Mapping[str, Any]]] = None,
    tool_choice: Union[str, Mapping[str, Any], None] = None,
    parallel_tool_calls: bool = True,
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
        conversations: a sequence of conversations (wrap a single one in a list). A
            conversation may hold tool-calling turns as OpenAI's API writes them: an
            assistant message with ``tool_calls`` (and ``content`` None), then ``tool``
            messages with ``tool_call_id`` and the result as ``content``.
        params: one :class:`SamplingParams` for all conversations, or one per conversation.
        tools: functions the model may call, OpenAI-style: ``[{"type": "function",
            "function": {"name", "description", "parameters": <JSON schema>}}]``. They are
            rendered by the template (its ``tools`` variable) in the model's own call
            format, or, for a template without tool support, described in a system block
            asking for a JSON reply. Each Output then has ``tool_calls`` and ``content``.
        tool_choice: "auto" (the default with tools: the model answers or calls; a call,
            once started, follows the tools' schemas by grammar), "required" (the reply is
            calls, by grammar), ``{"type": "function", "function": {"name": ...}}`` (a
            call of that tool, by grammar) or "none" (no tools in the prompt, no grammar).
        parallel_tool_calls: allow several calls in one reply (where the format can).
        chat_template: None for the model's template; else Jinja template text or a
            llama.cpp built-in name such as "chatml" (needed for a model without one).
        progress: a progress bar on stderr; None shows it when stderr is a terminal.
        **overrides: any SamplingParams field, applied on top of ``params``.

    Returns:
        A :class:`BatchResult` in conversation order; ``Completion.prompt`` is the
        formatted prompt. With tools, a reply that is tool calls has finish_reason
        "tool_calls" and ``Output.tool_calls`` (ids unique, arguments as JSON text
        matching the tool's schema); other replies have ``tool_calls == []``.

    Raises:
        TypeError, ValueError: malformed conversations or tools (the message names the
            index and field), bad params, tools combined with a grammar, or no usable chat
            template; all before any generation.
        FileNotFoundError, ModelLoadError, GenerationError: as for generate_parallel.
    """
    convs = conversation_list(conversations)
    request = tool_request(tools, tool_choice, parallel_tool_calls)
    per_conv = param_list(params, overrides, len(convs))
    bar = make_progress(progress, len(convs))  # checks progress before the model loads

    def render(m: Model) -> Tuple[ToolPlan, List[PreparedPrompt]]:
        plan = ToolPlan(ChatTemplate(m, chat_template), request)
        return plan, prepare_all(m, _render_all(plan, convs))

    rendered = OncePerModel(render)
    # A Model opened here gets a context sized to these conversations, rendered once.
    with open_model(model, sized_to(lambda m: rendered(m)[1], [p.max_tokens for p in per_conv])) as m:
        plan, prompts = rendered(m)
        per_conv = [plan.params(plan.template.add_stops(p)) for p in per_conv]
        with bar as on_step:
            return run_batch(m, prompts, per_conv, on_step=on_step, tools=plan)


def apply_chat_template(
    model: Model,
    messages: Conversation,
    *,
    tools: Optional[Sequence[Mapping[str, Any]]] = None,
    tool_choice: Union[str, Mapping[str, Any], None] = None,
    chat_template: Optional[str] = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text chat_parallel would build for one conversation (with these tools)."""
    plan = ToolPlan(ChatTemplate(model, chat_template), tool_request(tools, tool_choice))
    return plan.render(conversation_list([messages])[0], add_generation_prompt)


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


def _render_all(plan: ToolPlan, convs: List[List[Message]]) -> List[str]:
    prompts = []
    for i, conv in enumerate(convs):
        try:
            prompts.append(plan.render(conv))
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
        out.append(checked_conversation(f"conversations[{i}]", conv))
    return out


def checked_conversation(where: str, messages: Sequence[Any]) -> List[Message]:
    """Validated copies of a conversation's messages (``where[j]`` names message j in
    errors). A tool message without ``name`` gets the name of the call it answers."""
    out = [check_message(f"{where}[{j}]", msg) for j, msg in enumerate(messages)]
    names: Dict[str, str] = {}
    for m in out:
        for call in m.get("tool_calls") or ():
            if "id" in call:
                names[call["id"]] = call["function"]["name"]
        if m["role"] == "tool" and "name" not in m and m.get("tool_call_id") in names:
            m["name"] = names[m["tool_call_id"]]
    return out


def check_message(where: str, msg: Any) -> Message:
    """``msg`` as a plain dict, after checking it is a message (tool-calling turns
    included: an assistant's ``tool_calls``, a tool's ``tool_call_id``); errors name ``where``."""
    if not isinstance(msg, Mapping):
        raise TypeError(f"{where} must be a dict with 'role' and 'content', got {type(msg).__name__}")
    if "role" not in msg:
        raise ValueError(f"{where} has no 'role'")
    if not isinstance(msg["role"], str):
        raise TypeError(f"{where}['role'] must be a str, got {type(msg['role']).__name__}")
    if not msg["role"].strip():
        raise ValueError(f"{where}['role'] is empty")
    out = dict(msg)
    calls = out.pop("tool_calls", None)
    if calls:
        if msg["role"] != "assistant":
            raise ValueError(f"{where}['tool_calls']: only an assistant message has tool calls, this one's role is "
                             f"{msg['role']!r}")
        out["tool_calls"] = _tool_calls(f"{where}['tool_calls']", calls)
        if out.get("content") is None:
            out["content"] = None  # OpenAI's null content of a message that is only calls
        elif not isinstance(out["content"], str):
            raise TypeError(f"{where}['content'] must be a str or None, got {type(out['content']).__name__}")
        return out
    if "content" not in msg:
        raise ValueError(f"{where} has no 'content'")
    if not isinstance(msg["content"], str):
        raise TypeError(f"{where}['content'] must be a str, got {type(msg['content']).__name__}")
    for key in ("tool_call_id", "name"):
        if key in msg and not isinstance(msg[key], str):
            raise TypeError(f"{where}[{key!r}] must be a str, got {type(msg[key]).__name__}")
    return out


def _tool_calls(where: str, calls: Any) -> List[Dict[str, Any]]:
    """An assistant's tool calls in OpenAI's shape, arguments as JSON object text."""
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, _SequenceABC):
        raise TypeError(f"{where} must be a list of calls, got {type(calls).__name__}")
    out = []
    for k, call in enumerate(calls):
        at = f"{where}[{k}]"
        if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
            raise ValueError(f"{at} must be a dict {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                             f"'arguments': ...}}}}")
        fn = call["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{at}['function']['name'] must be a non-empty str, got {fn.get('name')!r}")
        if "id" in call and call["id"] is not None and not isinstance(call["id"], str):
            raise TypeError(f"{at}['id'] must be a str, got {type(call['id']).__name__}")
        args = fn.get("arguments", "{}")
        try:  # RecursionError: nested deeper than the interpreter's limit, a client's error too
            if isinstance(args, Mapping):
                args = json.dumps(dict(args), ensure_ascii=False)
            if not isinstance(args, str):
                raise TypeError(f"{at}['function']['arguments'] must be JSON text (or a dict), "
                                f"got {type(args).__name__}")
            parsed = json.loads(args)
        except (ValueError, RecursionError) as e:
            shown = repr(args[:80]) if isinstance(args, str) else "a dict"  # (repr of a deep dict fails too)
            raise ValueError(f"{at}['function']['arguments'] is not valid JSON ({type(e).__name__}: {e}): "
                             f"{shown}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{at}['function']['arguments'] must be a JSON object, got {args[:80]!r}")
        entry: Dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if call.get("id") is not None:
            entry = {"id": call["id"], **entry}
        out.append(entry)
    return out
