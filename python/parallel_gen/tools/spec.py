"""What a caller offers the model: tools (OpenAI's function tools), which of them it may or
must call (tool_choice) and whether several calls may come at once; checked here, before
any model is loaded, with errors that name the offending field."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from ..constraints import schema_grammar
from ..errors import ParamError, ParamTypeError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_ARGUMENTS: Dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str
    parameters: Dict[str, Any]
    """JSON schema of the arguments (an object)."""

    def to_openai(self) -> Dict[str, Any]:
        """The tool as OpenAI's API (and chat templates) write it."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


class ChoiceMode(enum.Enum):
    NONE = "none"
    """No calls: the tools are left out of the prompt and nothing is constrained."""
    AUTO = "auto"
    """The model answers or calls tools; a call, once started, is constrained."""
    REQUIRED = "required"
    """The output is one or more calls (by grammar)."""
    NAMED = "named"
    """The output is a call of one given tool (by grammar)."""


@dataclass(frozen=True)
class ToolRequest:
    """Validated tools, tool_choice and parallel_tool_calls of one call."""

    tools: Tuple[Tool, ...]
    mode: ChoiceMode
    name: Optional[str] = None
    """The tool to call, when ``mode`` is NAMED."""
    parallel: bool = True
    """Several calls in one reply (where the model's format allows it)."""

    @property
    def many(self) -> bool:
        """A reply may hold several calls: parallel calls allowed, and no tool named (a
        named choice is one call, after which the reply ends)."""
        return self.parallel and self.mode is not ChoiceMode.NAMED

    @property
    def callable_tools(self) -> Tuple[Tool, ...]:
        """The tools a reply may call."""
        if self.mode is ChoiceMode.NAMED:
            return tuple(t for t in self.tools if t.name == self.name)
        return self.tools if self.mode is not ChoiceMode.NONE else ()


def tool_request(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = True) -> Optional[ToolRequest]:
    """Checks OpenAI-style ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

    ``tools`` is a list of ``{"type": "function", "function": {"name", "description",
    "parameters"}}``; ``tool_choice`` is "none", "auto" (the default), "required" or
    ``{"type": "function", "function": {"name": ...}}``. Returns None without tools.

    Raises:
        TypeError, ValueError: naming the field: a malformed tool, a duplicate name, a
            parameters schema the grammar converter cannot handle, an unknown named tool,
            tool_choice without tools.
    """
    if not isinstance(parallel_tool_calls, bool):
        raise ParamTypeError(f"parallel_tool_calls must be a bool, got {type(parallel_tool_calls).__name__}",
                             "parallel_tool_calls")
    if tools is None:
        if tool_choice is not None and tool_choice != "none":
            raise ParamError(f"tool_choice={tool_choice!r} needs tools: pass tools=[...] (the functions the model "
                             "may call)", "tool_choice")
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ParamTypeError(f"tools must be a list of tools ({{'type': 'function', 'function': {{...}}}}), "
                             f"got {type(tools).__name__}", "tools")
    if len(tools) == 0:
        raise ParamError("tools is empty: give at least one tool, or tools=None for none", "tools")
    parsed = tuple(_tool(f"tools[{i}]", t) for i, t in enumerate(tools))
    seen: Dict[str, int] = {}
    for i, t in enumerate(parsed):
        if t.name in seen:
            raise ParamError(f"tools[{i}]['function']['name']: {t.name!r} is also the name of tools[{seen[t.name]}]",
                             "tools")
        seen[t.name] = i
    mode, name = _choice(tool_choice, parsed)
    return ToolRequest(parsed, mode, name, parallel_tool_calls)


def _tool(where: str, tool: Any) -> Tool:
    if not isinstance(tool, Mapping):
        raise ParamTypeError(f"{where} must be a dict {{'type': 'function', 'function': {{...}}}}, "
                             f"got {type(tool).__name__}", "tools")
    if tool.get("type", "function") != "function":
        raise ParamError(f"{where}['type'] must be 'function', got {tool.get('type')!r}", "tools")
    fn = tool.get("function")
    if not isinstance(fn, Mapping):
        raise ParamError(f"{where}['function'] must be a dict with 'name' (and 'description', 'parameters')", "tools")
    where = f"{where}['function']"
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ParamError(f"{where}['name'] must be 1-64 letters, digits, '_' or '-', got {name!r}", "tools")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise ParamTypeError(f"{where}['description'] must be a str, got {type(description).__name__}", "tools")
    params = fn.get("parameters")
    if params is None or params == {}:
        params = dict(NO_ARGUMENTS)  # no arguments
    if not isinstance(params, Mapping):
        raise ParamTypeError(f"{where}['parameters'] must be a JSON schema (a dict), got {type(params).__name__}",
                             "tools")
    if params.get("type", "object") != "object":
        raise ParamError(f"{where}['parameters'] must describe an object (the arguments), got type "
                         f"{params.get('type')!r}", "tools")
    params = dict(params)
    params.setdefault("type", "object")
    try:
        schema_grammar(params)
    except ValueError as e:
        raise ParamError(f"{where}['parameters']: {e}", "tools") from None
    return Tool(name, description, params)


def _choice(choice: Any, tools: Tuple[Tool, ...]) -> Tuple[ChoiceMode, Optional[str]]:
    if choice is None:
        return ChoiceMode.AUTO, None
    if isinstance(choice, str):
        try:
            mode = ChoiceMode(choice)
        except ValueError:
            mode = ChoiceMode.NAMED
        if mode is ChoiceMode.NAMED:
            raise ParamError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                             f"{{'name': ...}}}}, got {choice!r}", "tool_choice")
        return mode, None
    if not isinstance(choice, Mapping):
        raise ParamTypeError(f"tool_choice must be a str or a dict, got {type(choice).__name__}", "tool_choice")
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if choice.get("type", "function") != "function" or not isinstance(name, str):
        raise ParamError(f"tool_choice must be {{'type': 'function', 'function': {{'name': ...}}}}, "
                         f"got {dict(choice)!r}", "tool_choice")
    if not any(t.name == name for t in tools):
        raise ParamError(f"tool_choice['function']['name']: {name!r} is not one of the tools "
                         f"({', '.join(t.name for t in tools)})", "tool_choice")
    return ChoiceMode.NAMED, name
