"""OpenAI's Responses API on the wire (``POST /v1/responses``): its request, turned into the
chat request every chat surface shares (:meth:`ResponsesRequest.to_chat`), and its output
objects and stream events, in the shapes the ``openai`` SDK parses.

A response here is one assistant message holding one ``output_text`` part. The server
keeps nothing between requests, so ``store: true``, ``previous_response_id``,
``conversation`` and ``background: true`` are refused (400 naming the field): the client
sends the whole conversation in ``input``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator
from typing_extensions import Annotated

from .protocol import ChatCompletionRequest, ChatMessage, JsonSchemaFormat, Number, ResponseFormat, Wire

# A chat request's field -> the Responses field it came from (for errors naming the field).
FIELDS_FROM_CHAT = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                    "json_schema": "text.format.schema", "response_format": "text.format"}


class InputText(Wire):
    """A text part of an input message (``output_text``: an earlier answer sent back)."""

    type: Literal["input_text", "output_text"]
    text: StrictStr


class InputMessage(Wire):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[StrictStr, List[InputText]]

    @model_validator(mode="before")
    @classmethod
    def _messages_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in (None, "message"):
            raise ValueError(f"item type {kind!r} is not supported: input holds messages (role and content)")
        return data

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TextFormat(Wire):
    """``text.format``: the chat API's ``response_format`` with the schema's fields inlined."""

    type: Literal["text", "json_object", "json_schema"]
    name: Optional[StrictStr] = None
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[StrictBool] = None
    description: Optional[StrictStr] = None

    @model_validator(mode="after")
    def _schema_when_json_schema(self) -> "TextFormat":
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("schema: required when type is 'json_schema'")
        return self

    def to_chat(self) -> ResponseFormat:
        schema = None
        if self.schema_ is not None:
            schema = JsonSchemaFormat(name=self.name, schema=self.schema_, strict=self.strict)
        return ResponseFormat(type=self.type, json_schema=schema)


class TextConfig(Wire):
    format: Optional[TextFormat] = None


def _refuse(message: str) -> Any:
    def check(value: Any) -> Any:
        if value:
            raise ValueError(message)
        return value
    return check


_NO_TOOLS = "not supported on /v1/responses: send tools to /v1/chat/completions"
_NOTHING_KEPT = "this server keeps nothing between requests; send the whole conversation in input"


class ResponsesRequest(Wire):
    """``POST /v1/responses``."""

    model: Optional[StrictStr] = None
    input: Union[StrictStr, Annotated[List[InputMessage], Field(min_length=1)]]
    instructions: Optional[StrictStr] = None
    max_output_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    text: Optional[TextConfig] = None
    stream: StrictBool = False
    metadata: Optional[Dict[str, StrictStr]] = None
    store: Optional[StrictBool] = None
    background: Optional[StrictBool] = None
    previous_response_id: Optional[StrictStr] = None
    conversation: Optional[Any] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None

    _no_store = field_validator("store")(_refuse(f"not supported: {_NOTHING_KEPT}, with store false or unset"))
    _no_background = field_validator("background")(_refuse("not supported: stream the response instead"))
    _no_previous = field_validator("previous_response_id")(_refuse(f"not supported: {_NOTHING_KEPT}"))
    _no_conversation = field_validator("conversation")(_refuse(f"not supported: {_NOTHING_KEPT}"))
    # Refused, not dropped: a request with tools must not get a plain message it did not ask
    # for. (Tool calls are served by /v1/chat/completions.)
    _no_tools = field_validator("tools")(_refuse(_NO_TOOLS))

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none", "auto"):  # what a request without tools may say
            raise ValueError(_NO_TOOLS)
        return value

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion: ``instructions`` a system message first."""
        messages = [] if self.instructions is None else [ChatMessage(role="system", content=self.instructions)]
        if isinstance(self.input, str):
            messages.append(ChatMessage(role="user", content=self.input))
        else:
            messages += [ChatMessage(role=m.role, content=m.text()) for m in self.input]
        fmt = self.text.format if self.text is not None else None
        chat = ChatCompletionRequest(model=self.model, messages=messages, max_completion_tokens=self.max_output_tokens,
                                     temperature=self.temperature, top_p=self.top_p, stream=self.stream,
                                     response_format=fmt.to_chat() if fmt is not None else None)
        chat.also_ignored(self.ignored_fields())
        return chat

    def format_echo(self) -> Dict[str, Any]:
        """``text`` as the response repeats it."""
        fmt = self.text.format if self.text is not None else None
        return {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else {"type": "text"}}


# -- output ---------------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: List[Any] = []
    logprobs: List[Any] = []


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: List[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """The Response object (the whole answer, and the body of the lifecycle events)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: Optional[ResponseError] = None
    incomplete_details: Optional[IncompleteDetails] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    model: str
    output: List[OutputMessage] = []
    parallel_tool_calls: bool = False
    previous_response_id: None = None
    store: bool = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    text: Dict[str, Any] = {"format": {"type": "text"}}
    tool_choice: Literal["none"] = "none"
    tools: List[Any] = []
    truncation: Literal["disabled"] = "disabled"
    usage: Optional[ResponseUsage] = None
    metadata: Dict[str, str] = {}


class _Event(BaseModel):
    type: str
    sequence_number: int


class ResponseEvent(_Event):
    """``response.created``, ``.in_progress``, ``.completed``, ``.incomplete``, ``.failed``."""

    response: ResponseObject


class OutputItemEvent(_Event):
    """``response.output_item.added`` and ``.done``."""

    output_index: int = 0
    item: OutputMessage


class _PartEvent(_Event):
    """An event about the one content part of the one output message."""

    item_id: str
    output_index: int = 0
    content_index: int = 0


class ContentPartEvent(_PartEvent):
    """``response.content_part.added`` and ``.done``."""

    part: OutputText


class TextDeltaEvent(_PartEvent):
    """``response.output_text.delta``."""

    delta: str
    logprobs: List[Any] = []


class TextDoneEvent(_PartEvent):
    """``response.output_text.done``."""

    text: str
    logprobs: List[Any] = []


class ErrorEvent(_Event):
    """``error``: what went wrong mid-stream (then ``response.failed``)."""

    type: Literal["error"] = "error"
    code: Optional[str] = None
    message: str
    param: Optional[str] = None
