"""Input and output of ``parallel-gen generate``: prompt sources and result formats."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO, Any, Dict, Iterable, List, Optional, Sequence

from .results import BatchResult


class InputError(ValueError):
    """Prompts that cannot be read: the message names the source and line."""


@dataclass
class Item:
    """One input: a plain prompt, or a conversation (list of messages) to template."""

    prompt: Optional[str] = None
    messages: Optional[List[Dict[str, Any]]] = None


def read_text(lines: Iterable[str], source: str) -> List[Item]:
    """One prompt per line; blank lines are skipped (use JSONL for multi-line prompts)."""
    return [Item(prompt=line.rstrip("\r\n")) for line in lines if line.strip()]


def read_jsonl(lines: Iterable[str], source: str) -> List[Item]:
    """One JSON object per line: ``{"prompt": "..."}`` or ``{"messages": [...]}``."""
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object with \"prompt\" or \"messages\", "
                             f"got {type(obj).__name__}")
        has_prompt, has_messages = "prompt" in obj, "messages" in obj
        if has_prompt == has_messages:
            raise InputError(f"{where}: give exactly one of \"prompt\" or \"messages\"")
        if has_prompt:
            if not isinstance(obj["prompt"], str):
                raise InputError(f"{where}: \"prompt\" must be a string")
            items.append(Item(prompt=obj["prompt"]))
        else:
            if not isinstance(obj["messages"], list):
                raise InputError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
            items.append(Item(messages=obj["messages"]))
    return items


def input_format(name: str, explicit: str) -> str:
    """"text" or "jsonl": as asked, else by file extension."""
    if explicit != "auto":
        return explicit
    return "jsonl" if name.lower().endswith((".jsonl", ".ndjson")) else "text"


def records(result: BatchResult, items: Sequence[Item]) -> List[Dict[str, Any]]:
    """One JSON-ready dict per completion, in input order."""
    out = []
    for c, item in zip(result, items):
        rec: Dict[str, Any] = {
            "index": c.index,
            "prompt": c.prompt,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
            "tokens": len(c.token_ids),  # of the first output, like text and finish_reason
            "prompt_tokens": c.prompt_tokens,
        }
        if item.messages is not None:
            rec["messages"] = item.messages
        if c.error:
            rec["error"] = c.error
        if c.outputs[0].logprobs is not None:  # [token text, logprob] per generated token
            rec["logprobs"] = [[t.token, t.logprob] for t in c.outputs[0].logprobs]
            rec["cumulative_logprob"] = c.outputs[0].cumulative_logprob
        if len(c.outputs) > 1:  # SamplingParams.n > 1: every sample, the first one also above
            rec["outputs"] = [{"text": o.text, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                               "tokens": len(o.token_ids), **({"error": o.error} if o.error else {})}
                              for o in c.outputs]
        out.append(rec)
    return out


def write_jsonl(result: BatchResult, items: Sequence[Item], out: IO[str]) -> None:
    for rec in records(result, items):
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_text(result: BatchResult, out: IO[str]) -> None:
    """The texts alone (every sample of every prompt), separated by a blank line."""
    first = True
    for c in result:
        for o in c.outputs:
            if not first:
                out.write("\n")
            first = False
            out.write((o.text if o.finish_reason != "error" else f"[error: {o.error}]") + "\n")
