"""Chat templates: turning a list of messages into the prompt a model was trained on.

The model's template is the Jinja text in its GGUF (``tokenizer.chat_template``). It is
rendered here the way Hugging Face transformers (and llama-cpp-python) render it: a
sandboxed Jinja2 environment with trim_blocks/lstrip_blocks, ``raise_exception``,
``strftime_now`` and transformers' ``tojson``, and the variables ``messages``, ``tools``,
``bos_token``, ``eos_token`` and ``add_generation_prompt``. llama.cpp's own
``llama_chat_apply_template`` only recognises a template family and applies a
hand-written copy of it: for SmolLM2 it drops the default system message the real
template adds. llama.cpp's renderer is still used for its built-in names
(``chat_template="chatml"``) and for a template Jinja2 cannot parse but llama.cpp
recognises.

Tool-calling histories (an assistant message with ``tool_calls``, then ``tool``
messages) are rendered through the template when it knows them (found by rendering probe
conversations, as llama.cpp does); otherwise the calls are written into the assistant's
content and the results into user messages as JSON, so nothing is dropped.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import jinja2
import jinja2.ext
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ._native import llama_cpp
from .tools.formats import GENERIC, ToolFormat, format_for

if TYPE_CHECKING:
    from .model import Model
    from .params import SamplingParams

Message = Dict[str, Any]

# Stand-in answer used to find what a template writes after an assistant turn.
_SENTINEL = "PARALLEL_GEN_END_OF_TURN_PROBE"
# Stand-ins used to find which tool-calling parts of a conversation a template renders.
_TOOL_PROBE = "parallel_gen_probe_tool"
_ARG_PROBE = "PARALLEL_GEN_ARGUMENT_PROBE"
_RESULT_PROBE = "PARALLEL_GEN_TOOL_RESULT_PROBE"


@lru_cache(maxsize=1)
def builtin_templates() -> Tuple[str, ...]:
    """Names of the chat templates built into llama.cpp ("chatml", "gemma", "llama3", ...)."""
    n = llama_cpp.llama_chat_builtin_templates((ctypes.c_char_p * 1)(), 0)
    out = (ctypes.c_char_p * max(n, 1))()
    n = llama_cpp.llama_chat_builtin_templates(out, n)
    return tuple(out[i].decode() for i in range(n))


class ChatTemplate:
    """A chat template bound to one model's special tokens.

    Args:
        model: the Model whose template (and BOS/EOS token texts) to use.
        template: None for the model's own template; else Jinja template text, or the
            name of a llama.cpp built-in template (see :func:`builtin_templates`).

    Raises:
        ValueError: no template (the model has none and none was given), an unknown
            built-in name, or a template neither Jinja2 nor llama.cpp can use.
        TypeError: ``template`` is not a str.
    """

    def __init__(self, model: "Model", template: Optional[str] = None) -> None:
        if template is not None and not isinstance(template, str):
            raise TypeError(f"chat_template must be a str (Jinja text or a built-in name), "
                            f"got {type(template).__name__}")
        if template is None:
            template = model.chat_template()
            if template is None:
                raise ValueError(
                    f"the model {model.description!r} ({model.path}) has no chat template (it is probably a base "
                    "model, not a chat model): pass chat_template= (--chat-template on the command line) with Jinja "
                    "template text or a llama.cpp "
                    "built-in name such as 'chatml', 'gemma' or 'llama3' (all: "
                    "parallel_gen.templates.builtin_templates()), or use generate_parallel with plain prompts"
                )
        if template.strip() == "":
            raise ValueError("chat_template is empty")
        self.source = template
        self._model = model
        bos_id, self._bos = _special_token(model, "bos")
        _, self._eos = _special_token(model, "eos")
        # A model that adds BOS itself would get it twice from a template writing {{ bos_token }}.
        self._strip_bos = bool(self._bos) and model.tokenize("", add_special=True) == [bos_id]
        self._jinja: Optional[jinja2.Template] = None
        if _looks_like_jinja(template):
            try:
                self._jinja = _ENVIRONMENT.from_string(template)
            except jinja2.TemplateSyntaxError as e:
                if _llama_render(template, [{"role": "user", "content": "x"}], True) is None:
                    raise ValueError(f"chat_template is not valid Jinja ({e}) and llama.cpp does not "
                                     "recognise it either") from None
        elif template not in builtin_templates():
            raise ValueError(f"chat_template={template!r} is neither Jinja template text nor a llama.cpp "
                             f"built-in template name ({', '.join(builtin_templates())})")
        self.renderer = "jinja2" if self._jinja is not None else "llama.cpp"
        self.end_of_turn, self.end_of_turn_token = self._find_end_of_turn()

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Optional[Sequence[Dict[str, Any]]] = None) -> str:
        """The prompt for ``messages`` (already validated, see chat.py), ending with the
        assistant's turn opener when ``add_generation_prompt``. ``tools`` (OpenAI-style
        tool dicts) is handed to the template's ``tools`` variable.

        Raises ValueError when the template rejects the conversation (for instance
        roles that do not alternate).
        """
        if any(_has_tool_parts(m) for m in messages):
            messages = self._fit_tool_history(messages)
        if self._jinja is not None:
            try:
                text = self._render_jinja([_template_message(m) for m in messages], add_generation_prompt, tools)
            except jinja2.TemplateError as e:
                raise ValueError(f"the chat template failed: {e}") from None
            except (TypeError, LookupError, AttributeError) as e:  # the template's own bug, or data it cannot take
                raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from None
            # ValueError from the template's raise_exception(...) passes through as is.
        else:
            rendered = _llama_render(self.source, messages, add_generation_prompt)
            if rendered is None:
                raise ValueError(f"llama.cpp could not apply chat template {self.source[:60]!r}")
            text = rendered
        if self._strip_bos and text.startswith(self._bos):
            text = text[len(self._bos):]
        return text

    def _render_jinja(self, messages: List[Message], add_generation_prompt: bool,
                      tools: Optional[Sequence[Dict[str, Any]]]) -> str:
        if self._jinja is None:
            raise RuntimeError("this chat template has no Jinja form")
        # The variables llama-cpp-python's Jinja2ChatFormatter passes, so that templates
        # testing for them render as they did there.
        return self._jinja.render(messages=messages, eos_token=self._eos, bos_token=self._bos,
                                  add_generation_prompt=add_generation_prompt, tools=list(tools) if tools else None,
                                  functions=None, function_call=None, tool_choice=None)

    @cached_property
    def caps(self) -> "TemplateCaps":
        """What of a tool-calling conversation the template renders (probed once)."""
        if self._jinja is None:  # llama.cpp's renderer: roles and contents only
            return TemplateCaps(tools=False, tool_calls=False, tool_role=False, system_role=True)
        call = {"id": "probe0001", "type": "function",
                "function": {"name": _TOOL_PROBE, "arguments": JsonArguments({"arg": _ARG_PROBE})}}
        tool = {"type": "function", "function": {
            "name": _TOOL_PROBE, "description": "A probe.",
            "parameters": {"type": "object", "properties": {"arg": {"type": "string"}}, "required": ["arg"]}}}
        history = [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "", "tool_calls": [call]},
                   {"role": "tool", "content": _RESULT_PROBE, "tool_call_id": "probe0001", "name": _TOOL_PROBE},
                   {"role": "assistant", "content": "Done."}, {"role": "user", "content": "Bye"}]
        with_tools = self._probe([history[0]], tools=[tool])
        with_calls = self._probe(history, tools=[tool])
        with_system = self._probe([{"role": "system", "content": _RESULT_PROBE}, history[0]])
        return TemplateCaps(tools=_TOOL_PROBE in with_tools, tool_calls=_ARG_PROBE in with_calls,
                            tool_role=_RESULT_PROBE in with_calls, system_role=_RESULT_PROBE in with_system)

    @cached_property
    def tool_format(self) -> ToolFormat:
        """How the model writes tool calls: its template family's format, when the
        template renders the tools; else the generic JSON format."""
        if self._jinja is None or not self.caps.tools:
            return GENERIC
        return format_for(self.source)

    def _probe(self, messages: List[Message], tools: Optional[List[Dict[str, Any]]] = None) -> str:
        try:
            return self._render_jinja(messages, False, tools)
        except Exception:  # a template refusing the probe does not support what it probes
            return ""

    def _fit_tool_history(self, messages: Sequence[Message]) -> List[Message]:
        """Tool calls and tool results the template does not render, as JSON text in
        messages it does render: the assistant's content; user messages (consecutive
        results in one)."""
        caps = self.caps
        out: List[Message] = []
        merging = False  # the last message out holds tool results as text
        for m in messages:
            if m["role"] == "tool" and not caps.tool_role:
                result = {"tool_response": {k: m[k] for k in ("name", "tool_call_id", "content") if k in m}}
                text = json.dumps(result, ensure_ascii=False)
                if merging:
                    out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}
                else:
                    out.append({"role": "user", "content": text})
                merging = True
                continue
            merging = False
            if m.get("tool_calls") and not caps.tool_calls:
                calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                         for c in m["tool_calls"]]
                text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
                out.append({"role": "assistant", "content": f"{m['content']}\n{text}" if m.get("content") else text})
            else:
                out.append(m)
        return out

    def add_stops(self, params: "SamplingParams") -> "SamplingParams":
        """``params`` that also stop at this template's end-of-turn marker."""
        if self.end_of_turn_token is not None:
            if self.end_of_turn_token in params.stop_token_ids:
                return params
            return params.replace(stop_token_ids=params.stop_token_ids + (self.end_of_turn_token,))
        if self.end_of_turn is not None and self.end_of_turn not in params.stop:
            return params.replace(stop=params.stop + (self.end_of_turn,))
        return params

    def _find_end_of_turn(self) -> Tuple[Optional[str], Optional[int]]:
        """What the template writes right after an assistant's answer ("<|im_end|>", ...).

        As one special token of the model it becomes a stop token (special tokens are not
        part of the generated text, so a stop string would never see it); otherwise a
        stop string. None when the template closes turns with nothing recognisable.
        """
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = self.render(probe, add_generation_prompt=False)
        except ValueError:
            return None, None
        at = text.rfind(_SENTINEL)
        if at < 0:
            return None, None
        tail = text[at + len(_SENTINEL):].strip()
        marker = tail.splitlines()[0].strip() if tail else ""
        if not marker:
            return None, None
        ids = self._model.tokenize(marker, add_special=False, parse_special=True)
        plain = self._model.tokenize(marker, add_special=False, parse_special=False)
        if len(ids) == 1 and ids != plain:  # parsed as a special token, not as text
            return marker, ids[0]
        return marker, None


@dataclass(frozen=True)
class TemplateCaps:
    """Which parts of a tool-calling conversation a chat template renders."""

    tools: bool
    """The ``tools`` variable (the tools on offer)."""
    tool_calls: bool
    """An assistant message's ``tool_calls``."""
    tool_role: bool
    """The content of a ``tool`` message (a tool's result)."""
    system_role: bool
    """A system message (some templates refuse one)."""


class JsonArguments(dict):
    """A tool call's arguments as the template sees them: a dict (templates write
    ``arguments | tojson`` or iterate its items) that prints as JSON text (templates
    written for OpenAI's string arguments write ``{{ arguments }}``)."""

    def __str__(self) -> str:
        return json.dumps(self, ensure_ascii=False)


def _has_tool_parts(m: Message) -> bool:
    return bool(m.get("tool_calls")) or m["role"] == "tool"


def _template_message(m: Message) -> Message:
    """A validated message in the shape templates expect: tool-call arguments as
    :class:`JsonArguments`, and "" for the null content of an assistant's tool calls
    (as llama.cpp does: templates concatenate content)."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        fn = c["function"]
        calls.append({**c, "function": {**fn, "arguments": JsonArguments(json.loads(fn["arguments"]))}})
    return {**m, "content": m.get("content") or "", "tool_calls": calls}


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (it marks the tokens to
    train on): the body is rendered as it stands."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Optional[Tuple[str, str]] = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson`` filter: non-ASCII kept, no HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


_ENVIRONMENT = _environment()


def _looks_like_jinja(template: str) -> bool:
    # A bare word is meant as a built-in name: as Jinja it would render as constant text.
    return "{{" in template or "{%" in template


def _special_token(model: "Model", which: str) -> Tuple[Optional[int], str]:
    """(id, text) of the model's BOS or EOS token, from the GGUF metadata; (None, "") if unset."""
    value = model.metadata().get(f"tokenizer.ggml.{which}_token_id")
    try:
        token = int(value) if value is not None else -1
    except ValueError:
        token = -1
    if not 0 <= token < model.n_vocab:
        return None, ""
    return token, model.detokenize([token], render_special=True)


def _llama_render(template: str, messages: Sequence[Message], add_generation_prompt: bool) -> Optional[str]:
    """llama.cpp's renderer (a template name, or text it recognises); None if it cannot."""
    keep: List[bytes] = []  # the ctypes structs hold pointers into these
    chat = (llama_cpp.llama_chat_message * len(messages))()
    for i, m in enumerate(messages):
        role, content = m["role"].encode("utf-8"), m["content"].encode("utf-8")
        keep += [role, content]
        chat[i].role, chat[i].content = role, content
    tmpl = template.encode("utf-8")
    size = 2 * sum(len(b) for b in keep) + 4096
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(messages), add_generation_prompt, buf, size)
        if n < 0:
            return None
        if n <= size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n  # the buffer was too small: n is the size needed
    return None
