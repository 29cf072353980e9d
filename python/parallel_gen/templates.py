"""Chat templates: turning a list of messages into the prompt a model was trained on.

The model's template is the Jinja text in its GGUF (``tokenizer.chat_template``). It is
rendered with llama-cpp-python's Jinja2 chat formatter, the way Hugging Face
transformers renders it, because llama.cpp's own ``llama_chat_apply_template`` only
recognises a template family and applies a hand-written copy of it: for SmolLM2 it drops
the default system message the real template adds. llama.cpp's renderer is still used
for its built-in names (``chat_template="chatml"``) and for a template Jinja2 cannot
parse but llama.cpp recognises.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import jinja2

from ._native import llama_cpp

if TYPE_CHECKING:
    from .model import Model
    from .params import SamplingParams

Message = Dict[str, Any]

# Stand-in answer used to find what a template writes after an assistant turn.
_SENTINEL = "PARALLEL_GEN_END_OF_TURN_PROBE"


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
        # Two compiled formatters, one per add_generation_prompt, rather than flipping
        # the flag of one: render() then has no state to race on.
        self._jinja: Optional[Dict[bool, Any]] = None
        if _looks_like_jinja(template):
            try:
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                self._jinja = {gen: Jinja2ChatFormatter(template, eos_token=self._eos, bos_token=self._bos,
                                                        add_generation_prompt=gen) for gen in (True, False)}
            except jinja2.TemplateSyntaxError as e:
                if _llama_render(template, [{"role": "user", "content": "x"}], True) is None:
                    raise ValueError(f"chat_template is not valid Jinja ({e}) and llama.cpp does not "
                                     "recognise it either") from None
        elif template not in builtin_templates():
            raise ValueError(f"chat_template={template!r} is neither Jinja template text nor a llama.cpp "
                             f"built-in template name ({', '.join(builtin_templates())})")
        self.renderer = "jinja2" if self._jinja is not None else "llama.cpp"
        self.end_of_turn, self.end_of_turn_token = self._find_end_of_turn()

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages`` (already validated), ending with the assistant's
        turn opener when ``add_generation_prompt``.

        Raises ValueError when the template rejects the conversation (for instance
        roles that do not alternate).
        """
        if self._jinja is not None:
            try:
                text = self._jinja[add_generation_prompt](messages=list(messages)).prompt
            except jinja2.TemplateError as e:
                raise ValueError(f"the chat template failed: {e}") from None
            # ValueError from the template's raise_exception(...) passes through as is.
        else:
            rendered = _llama_render(self.source, messages, add_generation_prompt)
            if rendered is None:
                raise ValueError(f"llama.cpp could not apply chat template {self.source[:60]!r}")
            text = rendered
        if self._strip_bos and text.startswith(self._bos):
            text = text[len(self._bos):]
        return text

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
