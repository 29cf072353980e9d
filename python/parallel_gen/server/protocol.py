"""The OpenAI wire format: request and response bodies as pydantic models.

Requests check types and shapes only; values (ranges, grammars, token ids) are checked
by SamplingParams and the Model, so there is one source of truth for them. Fields the
OpenAI API has but this server does not implement are either ignored with a log line
(``user``, ``service_tier``, ...) or refused with a 400 when honouring them silently
would change the answer (``echo``, ``best_of``, ``suffix``); unknown keys are logged at
any depth (:class:`Wire`), and ``null`` is "unset" for every field.
"""

from __future__ import annotations

import re
import time
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr,
                      field_validator, model_serializer, model_validator)

Number = Union[StrictInt, StrictFloat]

_INDEX = re.compile(r"\[\d+\]")


class Wire(BaseModel):
    """A request object, at any depth: ``null`` means unset (the field's default), as
    OpenAI treats it, and unknown keys are kept, to be logged as ignored, rather than
    refused: OpenAI clients send fields such as ``user`` or a message's ``name`` that
    change nothing here."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = {f.alias or name for name, f in cls.model_fields.items()}
        return {k: v for k, v in data.items() if v is not None or k not in known}

    def ignored_fields(self) -> List[str]:
        """Every unknown key, as a path (``stream_options.foo``, ``messages[].name``)."""
        return sorted(dict.fromkeys(_INDEX.sub("[]", path) for path in self._unknown("")))

    def _unknown(self, prefix: str) -> List[str]:
        found = [prefix + k for k in (self.model_extra or ())]
        for name, f in type(self).model_fields.items():
            found += _unknown_in(getattr(self, name), prefix + (f.alias or name))
        return found


def _unknown_in(value: Any, path: str) -> List[str]:
    if isinstance(value, Wire):
        return value._unknown(path + ".")
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _unknown_in(v, f"{path}[{i}]")]
    return []


class _Request(Wire):
    model: Optional[StrictStr] = None
    n: StrictInt = 1
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    seed: Optional[StrictInt] = None
    stop: Union[StrictStr, List[StrictStr], None] = None
    logit_bias: Optional[Dict[str, Number]] = None
    stream: StrictBool = False
    stream_options: Optional["StreamOptions"] = None
    # llama-server's extensions, under its names.
    top_k: Optional[StrictInt] = None
    min_p: Optional[Number] = None
    repeat_penalty: Optional[Number] = None
    ignore_eos: StrictBool = False
    grammar: Optional[StrictStr] = None
    json_schema: Union[Dict[str, Any], StrictStr, None] = None
    cache_prompt: StrictBool = True
    # Unknown fields of the request this one was converted from (a Responses request).
    _carried: List[str] = PrivateAttr(default_factory=list)

    def also_ignored(self, paths: List[str]) -> None:
        self._carried = list(paths)

    def ignored_fields(self) -> List[str]:
        return sorted(set(super().ignored_fields()) | set(self._carried))


class StreamOptions(Wire):
    include_usage: StrictBool = False


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: Union[StrictStr, List[StrictStr]]
    max_tokens: Optional[StrictInt] = 16  # OpenAI's default for this endpoint
    logprobs: Optional[StrictInt] = None
    echo: StrictBool = False
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None


class TextPart(Wire):
    type: Literal["text"]
    text: StrictStr


class FunctionCallIn(Wire):
    name: StrictStr
    arguments: Union[StrictStr, Dict[str, Any]] = "{}"


class ToolCallIn(Wire):
    """A call in an assistant message of the history (checked further by the chat path:
    its arguments must be a JSON object)."""

    id: Optional[StrictStr] = None
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"type": "function",
                               "function": {"name": self.function.name, "arguments": self.function.arguments}}
        return {"id": self.id, **out} if self.id is not None else out


class ChatMessage(Wire):
    role: StrictStr
    content: Union[StrictStr, List[TextPart], None] = None
    tool_calls: Optional[List[ToolCallIn]] = None
    tool_call_id: Optional[StrictStr] = None
    name: Optional[StrictStr] = None

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, role: str) -> str:
        # OpenAI's newer name for the system role; chat templates know "system" (llama.cpp maps it too).
        return "system" if role == "developer" else role

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: required in a {self.role!r} message (only an assistant's may be null)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_dict(self) -> Dict[str, Any]:
        """The message as the chat path takes it (:func:`parallel_gen.chat.checked_conversation`)."""
        out: Dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
            out["content"] = self.text() if self.content is not None else None
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class JsonSchemaFormat(Wire):
    name: Optional[StrictStr] = None
    schema_: Dict[str, Any] = Field(alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")
    """llama-server's inline schema of a ``json_object`` reply (OpenAI's has none)."""


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = None
    response_format: Optional[ResponseFormat] = None
    # Checked by parallel_gen.tools.tool_request, the in-process rule (400s name the field).
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Union[StrictStr, Dict[str, Any], None] = None
    parallel_tool_calls: StrictBool = True


# -- responses ------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int
    """Prompt tokens whose KV was reused from the prompt cache (or a shared prefix)."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(BaseModel):
    """The legacy completions endpoint's logprobs shape."""

    tokens: List[str] = []
    token_logprobs: List[float] = []
    top_logprobs: List[Dict[str, float]] = []
    text_offset: List[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class _Envelope(BaseModel):
    """The fields every completion, chat completion and chunk starts with, in OpenAI's order."""

    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: Optional[str] = None
    """The model file and every setting that changes its outputs (OpenAI's field, nullable)."""


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: Optional[List[TokenLogprob]] = None


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """JSON object text."""


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[List[ToolCallOut]] = None

    @model_serializer(mode="wrap")
    def _omit_no_calls(self, handler: Any) -> Dict[str, Any]:
        # As OpenAI writes it: tool_calls only in a reply that has calls.
        return {k: v for k, v in handler(self).items() if k != "tool_calls" or v is not None}


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: List[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    """A streamed call: this server sends each call whole, in one delta."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[List[ToolCallDelta]] = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> Dict[str, Any]:
        # As OpenAI writes deltas: {"content": "..."}, {"role": ..., "content": ...} or {}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "parallel_gen"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
