"""Output constraints as GBNF grammars: a fixed set of choices, or a JSON schema."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence, Union



def _literal(text: str) -> str:
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
    return "root ::= " + " | ".join(_literal(c) for c in choices) + "\n"


def schema_grammar(schema: Union[Mapping[str, Any], str]) -> str:
    """GBNF for JSON matching ``schema``, with llama-cpp-python's converter.

    Raises ValueError for text that is not JSON or a schema the converter rejects.
    """
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    from ._native import llama_cpp  # on use: the CLI's options load no llama.cpp

    try:
        return llama_cpp.llama_grammar.json_schema_to_gbnf(text)
    except Exception as e:  # the converter raises assorted types on unsupported schemas
        raise ValueError(f"cannot convert the schema to a grammar: {type(e).__name__}: {e}") from None
