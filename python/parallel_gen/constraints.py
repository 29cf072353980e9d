"""Output constraints as GBNF grammars: a fixed set of choices, a JSON schema, or a
grammar assembled from several schemas and hand-written rules (tool calls)."""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, Dict, Mapping, Sequence, Union


SCHEMA_CACHE_SIZE = 256
"""Distinct JSON schemas whose grammar is remembered (least recently used dropped)."""

# llama-cpp-python 0.3.36's converter lets a JSON string hold raw control characters
# (its `char` rule is `[^"\\]`), so a sampled newline inside a string gives text that
# json.loads rejects. JSON forbids U+0000-U+001F unescaped; llama.cpp's own converter
# excludes them (and DEL), and so do we, by replacing that one rule where it is emitted.
_LOOSE_CHAR = r'char ::= [^"\\] | '
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | '


def literal(text: str) -> str:
    """A GBNF string literal matching exactly ``text``."""
    out = []
    for ch in text:
        if ch in '"\\[]':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def choices_grammar(choices: Sequence[str]) -> str:
    """A grammar whose only sentences are the given choices."""
    return "root ::= " + " | ".join(literal(c) for c in choices) + "\n"


def schema_grammar(schema: Union[Mapping[str, Any], str]) -> str:
    """GBNF for JSON matching ``schema``, with llama-cpp-python's converter.

    Raises ValueError for text that is not JSON or a schema the converter rejects.
    """
    try:
        text = schema if isinstance(schema, str) else json.dumps(schema)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"not JSON-serialisable: {type(e).__name__}: {e}") from None
    return _text_grammar(text)


@functools.lru_cache(maxsize=SCHEMA_CACHE_SIZE)
def _text_grammar(text: str) -> str:
    """The conversion itself, remembered per distinct schema text: a large schema takes
    milliseconds, and a server request or a file job applies the same one to every prompt
    or row (a ValueError is not remembered: it is raised again)."""
    try:
        json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not valid JSON: {e}") from None
    from ._native import llama_cpp  # on use: the CLI's options load no llama.cpp

    try:
        return strict_strings(llama_cpp.llama_grammar.json_schema_to_gbnf(text))
    except Exception as e:  # the converter raises assorted types on unsupported schemas
        raise ValueError(f"cannot convert the schema to a grammar: {type(e).__name__}: {e}") from None


def strict_strings(grammar: str) -> str:
    """``grammar`` (the converter's output) with JSON strings that cannot hold raw
    control characters."""
    return "\n".join(_STRICT_CHAR + line[len(_LOOSE_CHAR):] if line.startswith(_LOOSE_CHAR) else line
                     for line in grammar.split("\n"))


def schema_conversions() -> int:
    """How many schema -> grammar conversions have run in this process (cache misses)."""
    return _text_grammar.cache_info().misses


class GrammarBuilder:
    """One GBNF grammar made of JSON schemas' rules (llama-cpp-python's converter) and
    rules written by hand; :meth:`build` gives the text with a ``root`` rule."""

    def __init__(self) -> None:
        from ._native import llama_cpp  # on use, as above

        self._converter = llama_cpp.llama_grammar.SchemaConverter(prop_order={}, allow_fetch=False, dotall=False,
                                                                  raw_pattern=False)
        self._rules: Dict[str, str] = {}

    def schema(self, schema: Mapping[str, Any], name: str) -> str:
        """The name of a rule matching JSON text valid for ``schema`` (its rules are
        prefixed with ``name``). Raises ValueError for a schema the converter rejects."""
        try:
            resolved = self._converter.resolve_refs(copy.deepcopy(dict(schema)), name)
            return self._converter.visit(resolved, name)
        except Exception as e:  # the converter raises assorted types on unsupported schemas
            raise ValueError(f"cannot convert the schema to a grammar: {type(e).__name__}: {e}") from None

    def rule(self, name: str, body: str) -> str:
        """Adds ``name ::= body``; returns ``name``."""
        self._rules[name] = body
        return name

    def build(self, root: str) -> str:
        rules = dict(self._rules, root=root)
        body = "\n".join(f"{k} ::= {v}" for k, v in rules.items())
        return strict_strings(self._converter.format_grammar()) + "\n" + body + "\n"
