"""Tool-call formats: how the models of each chat-template family write a call, found from
the template's text, with the grammar that makes the model write one and the parser that
reads it back.

The families are those llama.cpp's chat code (common/chat.cpp and its parsers) handles
as common: Hermes 2 Pro / Qwen 2.5-3 (``<tool_call>{json}</tool_call>``), Qwen3-Coder /
Qwen3.5 (``<tool_call><function=..><parameter=..>``), Llama 3.x (a bare JSON object),
Mistral Nemo (``[TOOL_CALLS][{...}]``), Mistral Small 3.2 / Magistral / Devstral
(``[TOOL_CALLS]name[ARGS]{...}``), DeepSeek R1 and V3.1, Command R7B, Granite, Nemotron
Nano v2, Seed-OSS, Apriel, FireFunction v2 and Functionary v3.1. A template of none of these (or without
tool support) gets :data:`GENERIC`: a system block describing the tools and a JSON reply.
"""

from __future__ import annotations

import abc
import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..constraints import GrammarBuilder, literal
from .spec import ChoiceMode, Tool, ToolRequest

_ID_CHARS = string.ascii_letters + string.digits
_DECODER = json.JSONDecoder()
# What reading model-written JSON raises: bad or cut text, and nesting deeper than the
# interpreter's recursion limit (which the parsers, promising never to raise, must catch too).
_JSON_ERRORS = (ValueError, RecursionError)
# Whitespace the grammar allows between the parts of a call (bounded: a model cannot
# spend its tokens on it).
_WS = "[ \\t\\n]{0,4}"
NL = "\n"


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str
    """The arguments, as JSON object text."""


@dataclass(frozen=True)
class ParsedReply:
    """A reply read as text and tool calls."""

    content: str
    """The text outside the calls."""
    calls: List[ParsedCall]
    started: bool
    """A call began (its start appeared in the text)."""
    complete: bool
    """Every call that began was read whole."""


NO_CALLS = ParsedReply("", [], False, True)


@dataclass(frozen=True)
class Constraint:
    """The grammar a reply follows; lazy (from the first match of a trigger regex on) when
    ``triggers`` is not empty."""

    grammar: str
    triggers: Tuple[str, ...] = ()


class ToolFormat(abc.ABC):
    """One family's way of writing tool calls."""

    name: str
    markers: Tuple[str, ...]
    """A template of this family contains all of these..."""
    excluded: Tuple[str, ...] = ()
    """...and none of these."""
    native: bool = True
    """The template renders the tools itself (else a system block describes them)."""
    multi: bool = True
    """A reply may hold several calls."""
    id_length: Optional[int] = None
    """Ids the family's templates accept: this many letters and digits (None: OpenAI-style)."""

    def detect(self, source: str) -> bool:
        return all(m in source for m in self.markers) and not any(m in source for m in self.excluded)

    @property
    def start_marker(self) -> Optional[str]:
        """The text every reply's calls start with (None: a call is the whole reply)."""
        return None

    def new_id(self) -> str:
        """A fresh call id (random, so unique in practice across batches and runs)."""
        if self.id_length is not None:
            return "".join(secrets.choice(_ID_CHARS) for _ in range(self.id_length))
        return "call_" + secrets.token_hex(12)

    def constraint(self, request: ToolRequest) -> Optional[Constraint]:
        """The grammar of a reply to ``request``: the calls alone for "required" and a
        named tool; lazy, from the start of a call on, for "auto"; None for "none"."""
        if request.mode is ChoiceMode.NONE:
            return None
        grammar = self.calls_grammar(request.callable_tools, request.many and self.multi)
        return Constraint(grammar, (self.trigger,) if request.mode is ChoiceMode.AUTO else ())

    @property
    @abc.abstractmethod
    def trigger(self) -> str:
        """A regex (ECMAScript) matching the start of a call; its first group is where
        :meth:`calls_grammar`'s text begins."""

    @abc.abstractmethod
    def calls_grammar(self, tools: Sequence[Tool], many: bool) -> str:
        """GBNF for one call of one of ``tools`` (or several, when ``many``)."""

    @abc.abstractmethod
    def parse(self, text: str) -> ParsedReply:
        """The calls in a reply (never raises: what cannot be read is content)."""


def _regex_literal(text: str) -> str:
    """``text`` as an ECMAScript regex (std::regex): syntax characters escaped."""
    return "".join("\\" + c if c in "^$\\.*+?()[]{}|/" else c for c in text)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_at(text: str, pos: int) -> Tuple[Any, int]:
    """The JSON value at ``pos`` (after whitespace) and where it ends; ValueError if none."""
    return _DECODER.raw_decode(text, _skip_ws(text, pos))


def _arguments(value: Any) -> Optional[str]:
    """Arguments as JSON object text: an object, or text holding one; None otherwise."""
    try:
        if isinstance(value, str):
            value = json.loads(value)
        return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None
    except _JSON_ERRORS:
        return None


def _reply(text: str, start: int, end: int, calls: List[ParsedCall], complete: bool) -> ParsedReply:
    """Calls read from ``text[start:end]``; the text before them is content, and so is the
    text after them unless it is a call that could not be read."""
    complete = complete and bool(calls)
    content = "\n".join(p for p in (text[:start].strip(), text[end:].strip() if complete else "") if p)
    return ParsedReply(content, calls, True, complete)


def _many(item: str, many: bool, sep: str = _WS) -> str:
    return f"{item} ({sep} {item})*" if many else item


@dataclass(frozen=True)
class _Marked(ToolFormat):
    """A format whose calls sit between ``open`` and ``close`` (all of them), each between
    ``call_open`` and ``call_close``; the first marker there starts a call."""

    name: str
    markers: Tuple[str, ...]
    excluded: Tuple[str, ...] = ()
    open: str = ""
    close: str = ""
    call_open: str = ""
    call_close: str = ""
    multi: bool = True
    id_length: Optional[int] = None

    @property
    def trigger(self) -> str:
        return "(" + _regex_literal(self.open or self.call_open) + ")"

    @property
    def start_marker(self) -> Optional[str]:
        return self.open or self.call_open or None


@dataclass(frozen=True)
class JsonCalls(_Marked):
    """Calls as JSON objects ``{name_key: ..., args_key: {...}}``: each wrapped in
    ``call_open``/``call_close``, or all in a JSON array (``array``) after ``open``."""

    array: bool = False
    name_key: str = "name"
    args_key: str = "arguments"
    start_regex: Optional[str] = None
    """The trigger, for a format whose calls have no marker (else the marker)."""

    @property
    def trigger(self) -> str:
        return self.start_regex or super().trigger

    def _call_schema(self, tool: Tool) -> Dict[str, Any]:
        return {"type": "object", "properties": {self.name_key: {"const": tool.name}, self.args_key: tool.parameters},
                "required": [self.name_key, self.args_key]}

    def calls_grammar(self, tools: Sequence[Tool], many: bool) -> str:
        g = GrammarBuilder()
        call = g.rule("tool-call", " | ".join(g.schema(self._call_schema(t), f"tool-{i}") for i, t in enumerate(tools)))
        g.rule("ws", _WS)
        if self.call_open:
            call = g.rule("wrapped-call", f"{literal(self.call_open)} ws {call} {literal(self.call_close)}"
                          if self.call_close else f"{literal(self.call_open)} ws {call}")
        if self.array:
            body = '"[" ws ' + _many(call, many, sep='"," ws') + ' "]"'
        else:
            body = _many(call, many, sep="ws")
        parts = [literal(self.open) if self.open else "", "ws" if self.open else "", body,
                 f"ws {literal(self.close)}" if self.close else ""]
        return g.build(" ".join(p for p in parts if p))

    def _start(self, text: str) -> int:
        marker = self.open or self.call_open
        if marker:
            return text.find(marker)
        m = re.match(r"\s*(<\|python_tag\|>)?\s*\{", text)  # Llama 3.x: a call is the whole reply
        return m.start() if m and _parses(text, m.end() - 1) else -1

    def parse(self, text: str) -> ParsedReply:
        start = self._start(text)
        if start < 0:
            return ParsedReply(text.strip(), [], False, True)
        pos = start + len(self.open)
        if not self.open and not self.call_open:
            pos = text.index("{", start)
        items: List[Any] = []
        complete = True
        try:
            if self.array:
                value, pos = _json_at(text, pos)
                items = value if isinstance(value, list) else [value]
            else:
                while True:
                    if self.call_open:
                        at = _skip_ws(text, pos)
                        if not text.startswith(self.call_open, at):
                            break
                        pos = at + len(self.call_open)
                    value, pos = _json_at(text, pos)
                    items.append(value)
                    if self.call_close:
                        at = _skip_ws(text, pos)
                        if text.startswith(self.call_close, at):
                            pos = at + len(self.call_close)
                        elif at < len(text):
                            complete = False
                            break
                    if not self.call_open or not self.multi:
                        break
            if self.close:
                at = _skip_ws(text, pos)
                if text.startswith(self.close, at):
                    pos = at + len(self.close)
        except _JSON_ERRORS:  # cut short or not JSON
            complete = False
        calls = [c for c in (self._call(v) for v in items) if c is not None]
        return _reply(text, start, pos, calls, complete and len(calls) == len(items))

    def _call(self, value: Any) -> Optional[ParsedCall]:
        if not isinstance(value, dict):
            return None
        if "function" in value and isinstance(value["function"], dict):  # OpenAI's shape, which models echo
            value = value["function"]
        name, args = value.get(self.name_key), _arguments(value.get(self.args_key, {}))
        return ParsedCall(name, args) if isinstance(name, str) and name and args is not None else None


def _parses(text: str, pos: int) -> bool:
    try:
        _json_at(text, pos)
        return True
    except _JSON_ERRORS:
        return False


@dataclass(frozen=True)
class NamedCalls(_Marked):
    """Calls as ``call_open NAME name_close {arguments} call_close``, all of them between
    ``open`` and ``close``."""

    name_close: str = ""
    id_marker: str = ""
    """A marker that may follow the name, then a call id (skipped when reading)."""

    def calls_grammar(self, tools: Sequence[Tool], many: bool) -> str:
        g = GrammarBuilder()
        alts = [f"{literal(self.call_open + t.name + self.name_close)} {g.schema(t.parameters, f'tool-{i}-args')}"
                + (f" {literal(self.call_close)}" if self.call_close else "") for i, t in enumerate(tools)]
        call = g.rule("tool-call", " | ".join(f"( {a} )" for a in alts))
        g.rule("ws", _WS)
        parts = [literal(self.open) if self.open else "", _many(call, many, sep="ws"),
                 literal(self.close) if self.close else ""]
        return g.build(" ".join(p for p in parts if p))

    def parse(self, text: str) -> ParsedReply:
        start = text.find(self.open or self.call_open)
        if start < 0:
            return ParsedReply(text.strip(), [], False, True)
        pos = start + len(self.open)
        calls: List[ParsedCall] = []
        complete = True
        opener, name_end, closer = self.call_open.strip(), self.name_close.strip(), self.call_close.strip()
        while True:
            at = _skip_ws(text, pos)
            if not text.startswith(opener, at):
                break
            at += len(opener)
            end = text.find(name_end, at)
            if end < 0:
                complete = False
                break
            name = text[at:end].strip()
            if self.id_marker and self.id_marker in name:
                name = name[:name.index(self.id_marker)].strip()
            try:
                value, pos = _json_at(text, end + len(name_end))
            except _JSON_ERRORS:
                complete = False
                break
            args = _arguments(value)
            if not name or args is None:
                complete = False
                break
            calls.append(ParsedCall(name, args))
            if closer:
                at = _skip_ws(text, pos)
                if text.startswith(closer, at):
                    pos = at + len(closer)
                elif at < len(text):
                    complete = False
                    break
            if not self.multi:
                break
        if self.close:
            at = _skip_ws(text, pos)
            if text.startswith(self.close, at):
                pos = at + len(self.close)
        return _reply(text, start, pos, calls, complete)


@dataclass(frozen=True)
class XmlCalls(_Marked):
    """Qwen3-Coder's calls: ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n
    </parameter>\\n...</function>\\n</tool_call>``, a string VALUE as plain text, others as
    JSON (the wrapper tags differ by family)."""

    call_open: str = "<tool_call>"
    call_close: str = "</tool_call>"

    def calls_grammar(self, tools: Sequence[Tool], many: bool) -> str:
        g = GrammarBuilder()
        g.rule("xml-text", "[^<]*")  # a string value: plain text up to the closing tag
        alts = []
        for i, t in enumerate(tools):
            props = t.parameters.get("properties") or {}
            required = set(t.parameters.get("required") or ())
            params = []
            for j, (key, schema) in enumerate(props.items()):
                value = _xml_value_rule(g, schema, f"tool-{i}-arg-{j}")
                param = f"{literal(f'<parameter={key}>' + NL)} {value} {literal(NL + '</parameter>' + NL)}"
                params.append(param if key in required else f"( {param} )?")
            alts.append(f"{literal(f'<function={t.name}>' + NL)} {' '.join(params)} {literal('</function>')}")
        call = g.rule("tool-call", f"{literal(self.call_open + NL)} ( {' | '.join(alts)} ) "
                                   f"{literal(NL + self.call_close)}")
        return g.build(_many(call, many, sep=literal(NL)))

    def parse(self, text: str) -> ParsedReply:
        start = text.find(self.call_open)
        if start < 0:
            return ParsedReply(text.strip(), [], False, True)
        calls: List[ParsedCall] = []
        pos, complete = start, True
        call = re.compile(re.escape(self.call_open) + r"\s*<function=([^>\n]+)>(.*?)</function>\s*(?:"
                          + re.escape(self.call_close) + "|$)", re.DOTALL)
        for m in call.finditer(text[start:]):
            if m.start() != pos - start and text[pos:start + m.start()].strip():
                break
            args = {}
            for p in re.finditer(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", m.group(2), re.DOTALL):
                args[p.group(1).strip()] = _xml_value(p.group(2))
            calls.append(ParsedCall(m.group(1).strip(), json.dumps(args, ensure_ascii=False)))
            pos = start + m.end()
        if self.call_open in text[pos:]:
            complete = False  # a call that did not close
        return _reply(text, start, pos, calls, complete)


def _xml_value_rule(g: GrammarBuilder, schema: Any, name: str) -> str:
    """A parameter value's rule: strings as plain text (an enum's as its choices), the
    rest as JSON."""
    if isinstance(schema, dict) and schema.get("type") == "string":
        choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if choices and all(isinstance(c, str) for c in choices):
            return g.rule(name, " | ".join(literal(c) for c in choices))
        return "xml-text"
    return g.schema(schema, name)


def _xml_value(raw: str) -> Any:
    """A parameter value: JSON when it reads as JSON (numbers, objects, ...), else text."""
    try:
        value = json.loads(raw)
    except _JSON_ERRORS:
        return raw
    return value if not isinstance(value, str) else raw


@dataclass(frozen=True)
class GenericJson(ToolFormat):
    """For templates without (known) tool support, as llama-server did: a system block
    lists the tools and asks for a JSON reply, ``{"tool_calls": [{"name", "arguments"}]}``
    or ``{"response": "..."}``, and the whole reply follows that shape by grammar."""

    name: str = "generic"
    markers: Tuple[str, ...] = ()
    native: bool = False

    def detect(self, source: str) -> bool:
        return True

    @property
    def trigger(self) -> str:  # (unused: "auto" constrains the whole reply, see constraint())
        return '^\\s*(\\{\\s*"tool_calls")'

    def system_block(self, request: ToolRequest) -> str:
        """What the system message says about the tools and the reply's shape."""
        listing = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                              for t in request.tools], ensure_ascii=False, indent=2)
        call = '{"tool_calls": [{"name": <tool name>, "arguments": <arguments object>}' + \
               (", ..." if request.many else "") + "]}"
        if request.mode is ChoiceMode.NAMED:
            ask = f'Call the tool "{request.name}": reply with only a JSON object {call}.'
        elif request.mode is ChoiceMode.REQUIRED:
            ask = f"Call one of these tools: reply with only a JSON object {call}."
        else:
            ask = (f"To call tools, reply with only a JSON object {call}. To answer without a tool, reply with "
                   'only a JSON object {"response": <your answer>}.')
        return f"You can call the following tools (JSON schemas of their arguments):\n{listing}\n\n{ask}"

    def constraint(self, request: ToolRequest) -> Optional[Constraint]:
        if request.mode is ChoiceMode.AUTO:  # the whole reply is JSON: calls or an answer
            return Constraint(self._grammar(request.tools, request.many, may_answer=True))
        return super().constraint(request)

    def calls_grammar(self, tools: Sequence[Tool], many: bool) -> str:
        return self._grammar(tools, many, may_answer=False)

    def _grammar(self, tools: Sequence[Tool], many: bool, may_answer: bool) -> str:
        g = GrammarBuilder()
        return g.build(g.schema(self._reply_schema(tools, many, may_answer), "reply"))

    def _reply_schema(self, tools: Sequence[Tool], many: bool, may_answer: bool) -> Dict[str, Any]:
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                           "required": ["name", "arguments"]} for t in tools]}
        calls: Dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
        if not many:
            calls["maxItems"] = 1
        reply = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
        if not may_answer:
            return reply
        answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
        return {"anyOf": [reply, answer]}

    def parse(self, text: str) -> ParsedReply:
        try:
            value, end = _json_at(text, 0)
        except _JSON_ERRORS:
            started = text.lstrip().startswith("{")
            calls = self._calls_before_cut(text) if started else []
            if calls:  # cut short after whole calls: those (the caller knows it was cut)
                return ParsedReply("", calls, True, False)
            return ParsedReply(text.strip(), [], started, not started)
        if not isinstance(value, dict) or text[end:].strip():
            return ParsedReply(text.strip(), [], False, True)
        if isinstance(value.get("response"), str) and "tool_calls" not in value:
            return ParsedReply(value["response"], [], False, True)
        items = value.get("tool_calls")
        if not isinstance(items, list):
            return ParsedReply(text.strip(), [], False, True)
        calls = self._calls(items)
        return ParsedReply("", calls, True, bool(calls) and len(calls) == len(items))

    @staticmethod
    def _calls(items: List[Any]) -> List[ParsedCall]:
        return [ParsedCall(c["name"], a) for c in items
                if isinstance(c, dict) and isinstance(c.get("name"), str)
                and (a := _arguments(c.get("arguments", {}))) is not None]

    def _calls_before_cut(self, text: str) -> List[ParsedCall]:
        """The calls a reply cut short had written whole (``{"tool_calls": [call, call, ...``)."""
        m = _CALLS_OPEN.match(text)
        if m is None:
            return []
        items, pos = [], m.end()
        try:
            while True:
                value, pos = _json_at(text, pos)
                items.append(value)
                pos = _skip_ws(text, pos)
                if not text.startswith(",", pos):
                    break
                pos += 1
        except _JSON_ERRORS:
            pass
        calls = self._calls(items)
        return calls if len(calls) == len(items) else []


_CALLS_OPEN = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')
GENERIC = GenericJson()

# First match wins: a family whose markers another family's templates also hold comes first.
FORMATS: Tuple[ToolFormat, ...] = (
    XmlCalls("qwen3_coder", ("<tool_call>", "<function=", "<parameter=")),
    XmlCalls("seed_oss", ("<seed:tool_call>", "<function=", "<parameter="), call_open="<seed:tool_call>",
             call_close="</seed:tool_call>"),
    JsonCalls("apriel", ("<tool_calls>[",), open="<tool_calls>", close="</tool_calls>", array=True),
    JsonCalls("hermes", ("<tool_call>",), excluded=("<arg_key>", "<invoke ", "<minimax:tool_call>"),
              call_open="<tool_call>", call_close="</tool_call>"),
    NamedCalls("mistral", ("[TOOL_CALLS]", "[ARGS]"), call_open="[TOOL_CALLS]", name_close="[ARGS]",
               id_marker="[CALL_ID]", id_length=9),
    JsonCalls("mistral_nemo", ("[TOOL_CALLS]",), open="[TOOL_CALLS]", array=True, id_length=9),
    NamedCalls("deepseek_r1", ("<｜tool▁calls▁begin｜>", "```json"), open="<｜tool▁calls▁begin｜>",
               close="<｜tool▁calls▁end｜>", call_open="<｜tool▁call▁begin｜>function<｜tool▁sep｜>",
               name_close="\n```json\n", call_close="\n```<｜tool▁call▁end｜>"),
    NamedCalls("deepseek_v3_1", ("<｜tool▁calls▁begin｜>",), open="<｜tool▁calls▁begin｜>",
               close="<｜tool▁calls▁end｜>", call_open="<｜tool▁call▁begin｜>", name_close="<｜tool▁sep｜>",
               call_close="<｜tool▁call▁end｜>"),
    JsonCalls("command_r7b", ("<|START_ACTION|>",), open="<|START_ACTION|>", close="<|END_ACTION|>", array=True,
              name_key="tool_name", args_key="parameters"),
    JsonCalls("nemotron_v2", ("<TOOLCALL>",), open="<TOOLCALL>", close="</TOOLCALL>", array=True),
    JsonCalls("granite", ("<|tool_call|>",), open="<|tool_call|>", array=True),
    JsonCalls("firefunction_v2", (" functools[",), open=" functools", array=True),
    NamedCalls("functionary_v3_1", ("<function=",), excluded=("<parameter=",), call_open="<function=", name_close=">",
               call_close="</function>"),
    JsonCalls("llama3", ("<|start_header_id|>", "parameters"), excluded=(">>>all",), args_key="parameters",
              multi=False, start_regex='^\\s*(\\{\\s*"name")'),
)


def format_for(source: Optional[str]) -> ToolFormat:
    """The tool-call format of the template ``source`` (Jinja text; None: a llama.cpp
    built-in template, which renders no tools): its family's, else :data:`GENERIC`."""
    if source is None:
        return GENERIC
    return next((f for f in FORMATS if f.detect(source)), GENERIC)


def format_named(name: str) -> ToolFormat:
    """The format called ``name`` (tests, and a caller that knows better than detection)."""
    for f in FORMATS + (GENERIC,):
        if f.name == name:
            return f
    raise ValueError(f"unknown tool-call format {name!r}: one of {', '.join(f.name for f in FORMATS + (GENERIC,))}")
