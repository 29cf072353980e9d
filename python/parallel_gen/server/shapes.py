"""How each endpoint writes its answer: the whole response, or the server-sent events of a
stream (what opens it, each generation event's chunks, what closes it or reports a failure).

One Shape per request, built by the route: every endpoint runs its call through the same
code in :mod:`.app`; only these objects differ.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional

from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from ..results import TokenLogprobs
from ..stream import StreamEvent
from .errors import APIError
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                       ChoiceLogprobs, CompletionChoice, CompletionLogprobs, CompletionResponse, DeltaMessage,
                       FunctionCall, TokenLogprob, ToolCallDelta, ToolCallOut, TopLogprob, Usage)
from .responses_protocol import (ContentPartEvent, ErrorEvent, IncompleteDetails, InputTokensDetails, OutputItemEvent,
                                 OutputMessage, OutputText, ResponseError, ResponseEvent, ResponseObject,
                                 ResponsesRequest, ResponseUsage, TextDeltaEvent, TextDoneEvent)
from .service import Choice, Call

DONE = "[DONE]"


def sse(data: str, event: Optional[str] = None) -> ServerSentEvent:
    return ServerSentEvent(data=data, event=event, sep="\n")


def to_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class Shape:
    """How one endpoint writes a call's choices, chunks and usage; ``model``: the name the
    answer carries."""

    def __init__(self, model: str) -> None:
        self.model = model

    def response(self, call: Call, choices: List[Choice], usage: Usage) -> BaseModel:
        raise NotImplementedError

    def opening(self, call: Call) -> List[ServerSentEvent]:
        """Events before the first generated token."""
        return []

    def chunks(self, call: Call, c: Choice, ev: StreamEvent) -> List[ServerSentEvent]:
        """The events for one stream event (``c``: its choice, ``ev`` already counted in)."""
        raise NotImplementedError

    def closing(self, call: Call, choices: List[Choice], usage: Usage) -> List[ServerSentEvent]:
        """The events after the last choice finished."""
        raise NotImplementedError

    def failed(self, call: Call, err: APIError) -> List[ServerSentEvent]:
        """The events that end a stream that failed."""
        raise NotImplementedError


class _ChunkShape(Shape):
    """The completions and chat streams: data-only chunks, the usage chunk when asked, then
    ``[DONE]``; a failure sends OpenAI's error object, then ``[DONE]``."""

    def __init__(self, model: str, include_usage: bool = False) -> None:
        super().__init__(model)
        self.include_usage = include_usage

    def usage_chunk(self, call: Call, usage: Usage) -> str:
        raise NotImplementedError

    def closing(self, call: Call, choices: List[Choice], usage: Usage) -> List[ServerSentEvent]:
        return ([sse(self.usage_chunk(call, usage))] if self.include_usage else []) + [sse(DONE)]

    def failed(self, call: Call, err: APIError) -> List[ServerSentEvent]:
        return [sse(to_json(err.body())), sse(DONE)]


class CompletionShape(_ChunkShape):
    @staticmethod
    def _logprobs(logprobs: Optional[List[TokenLogprobs]], offset: int = 0) -> Optional[CompletionLogprobs]:
        """``offset``: the text offset of the first token (a chunk's: the tokens' before it)."""
        if logprobs is None:
            return None
        out = CompletionLogprobs()
        for t in logprobs:
            out.tokens.append(t.token)
            out.token_logprobs.append(t.logprob)
            out.top_logprobs.append({a.token: a.logprob for a in t.top})
            out.text_offset.append(offset)
            offset += len(t.token)
        return out

    def response(self, call: Call, choices: List[Choice], usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=f"cmpl-{call.id}", system_fingerprint=call.fingerprint, model=self.model, usage=usage, choices=[
            CompletionChoice(index=c.index, text=c.text, logprobs=self._logprobs(c.logprobs),
                             finish_reason=c.finish_reason) for c in choices])

    def chunks(self, call: Call, c: Choice, ev: StreamEvent) -> List[ServerSentEvent]:
        if not ev.text and not ev.finished and not ev.logprobs:
            return []
        logprobs = None
        if ev.logprobs is not None:
            logprobs = self._logprobs(ev.logprobs, c.event_offset)
        choice = CompletionChoice(index=c.index, text=ev.text, finish_reason=ev.finish_reason if ev.finished else None,
                                  logprobs=logprobs)
        return [sse(CompletionResponse(id=f"cmpl-{call.id}", system_fingerprint=call.fingerprint, created=int(call.created), model=self.model,
                                       choices=[choice]).model_dump_json())]

    def usage_chunk(self, call: Call, usage: Usage) -> str:
        return CompletionResponse(id=f"cmpl-{call.id}", system_fingerprint=call.fingerprint, created=int(call.created), model=self.model, choices=[],
                                  usage=usage).model_dump_json()


class ChatShape(_ChunkShape):
    @staticmethod
    def _logprobs(logprobs: Optional[List[TokenLogprobs]]) -> Optional[ChoiceLogprobs]:
        if logprobs is None:
            return None
        return ChoiceLogprobs(content=[
            TokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode("utf-8")),
                         top_logprobs=[TopLogprob(token=a.token, logprob=a.logprob, bytes=list(a.token.encode("utf-8")))
                                       for a in t.top]) for t in logprobs])

    @staticmethod
    def _message(c: Choice) -> AssistantMessage:
        if c.tool_calls is None:  # no tools offered
            return AssistantMessage(content=c.text)
        calls = [ToolCallOut(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments)) for t in c.tool_calls]
        # As OpenAI answers: null content in a reply that is only calls.
        return AssistantMessage(content=c.content or (None if calls else ""), tool_calls=calls or None)

    def response(self, call: Call, choices: List[Choice], usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=f"chatcmpl-{call.id}", system_fingerprint=call.fingerprint, model=self.model, usage=usage, choices=[
            ChatChoice(index=c.index, message=self._message(c), logprobs=self._logprobs(c.logprobs),
                       finish_reason=c.finish_reason) for c in choices])

    def chunks(self, call: Call, c: Choice, ev: StreamEvent) -> List[ServerSentEvent]:
        def chunk(delta: DeltaMessage, finish: Optional[str] = None,
                  logprobs: Optional[ChoiceLogprobs] = None) -> ServerSentEvent:
            return sse(ChatCompletionChunk(id=f"chatcmpl-{call.id}", system_fingerprint=call.fingerprint, created=int(call.created), model=self.model, choices=[
                ChatChunkChoice(index=c.index, delta=delta, finish_reason=finish, logprobs=logprobs)]).model_dump_json())

        out = []
        if c.events == 1:  # this event is the choice's first: open with the role alone, as OpenAI does
            out.append(chunk(DeltaMessage(role="assistant", content="")))
        text = ev.text
        if call.plan is not None:  # with tools: only what is surely not a call, until the reply is read
            if not ev.finished:
                text = c.hold_back(call.plan, ev.text)
            else:  # read: its calls go in one delta, the content not sent yet now
                text = "" if c.tool_calls else _unsent(c.content or "", c.sent_text())
        if text or ev.logprobs:
            out.append(chunk(DeltaMessage(content=text), logprobs=self._logprobs(ev.logprobs) if ev.logprobs else None))
        if ev.finished and c.tool_calls:
            out.append(chunk(DeltaMessage(tool_calls=[
                ToolCallDelta(index=k, id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments))
                for k, t in enumerate(c.tool_calls)])))
        if ev.finished:
            out.append(chunk(DeltaMessage(), c.finish_reason))
        return out

    def usage_chunk(self, call: Call, usage: Usage) -> str:
        return ChatCompletionChunk(id=f"chatcmpl-{call.id}", system_fingerprint=call.fingerprint, created=int(call.created), model=self.model, choices=[],
                                   usage=usage).model_dump_json()


def _unsent(content: str, sent: str) -> str:
    """What of a reply's final ``content`` a stream has not sent yet, ``sent`` being sent
    (content is the reply's text, or that text stripped, or an answer read from JSON)."""
    for prefix in (sent, sent.lstrip()):
        if content.startswith(prefix):
            return content[len(prefix):]
    return content


class ResponsesShape(Shape):
    """``/v1/responses``: one assistant message of one ``output_text`` part; its stream is
    the Responses event sequence (``response.created`` ... ``response.completed``), each
    event numbered and named in the SSE ``event:`` field."""

    def __init__(self, model: str, request: ResponsesRequest) -> None:
        super().__init__(model)
        self.request = request
        self.sequence = 0

    def _object(self, call: Call, status: str, output: List[OutputMessage], usage: Optional[Usage] = None,
                error: Optional[APIError] = None) -> ResponseObject:
        params, req = call.params[0], self.request
        return ResponseObject(
            id=f"resp_{call.id}", created_at=int(call.created), status=status, model=self.model, output=output,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, temperature=params.temperature,
            top_p=params.top_p, text=req.format_echo(), metadata=req.metadata or {},
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            error=ResponseError(code=error.code or "server_error", message=error.message) if error else None,
            usage=ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                                total_tokens=usage.total_tokens,
                                input_tokens_details=_input_details(usage)) if usage else None)

    @staticmethod
    def _status(c: Choice) -> str:
        return "incomplete" if c.finish_reason == "length" else "completed"

    def _event(self, kind: type, name: str, **fields: Any) -> ServerSentEvent:
        event = kind(type=name, sequence_number=self.sequence, **fields)
        self.sequence += 1
        return sse(event.model_dump_json(), event=name)

    def response(self, call: Call, choices: List[Choice], usage: Usage) -> ResponseObject:
        status = self._status(choices[0])
        message = OutputMessage(id=f"msg_{call.id}", status=status, content=[OutputText(text=choices[0].text)])
        return self._object(call, status, [message], usage)

    def opening(self, call: Call) -> List[ServerSentEvent]:
        item = f"msg_{call.id}"
        return [self._event(ResponseEvent, "response.created", response=self._object(call, "in_progress", [])),
                self._event(ResponseEvent, "response.in_progress", response=self._object(call, "in_progress", [])),
                self._event(OutputItemEvent, "response.output_item.added",
                            item=OutputMessage(id=item, status="in_progress", content=[])),
                self._event(ContentPartEvent, "response.content_part.added", item_id=item, part=OutputText(text=""))]

    def chunks(self, call: Call, c: Choice, ev: StreamEvent) -> List[ServerSentEvent]:
        if not ev.text:
            return []
        return [self._event(TextDeltaEvent, "response.output_text.delta", item_id=f"msg_{call.id}", delta=ev.text)]

    def closing(self, call: Call, choices: List[Choice], usage: Usage) -> List[ServerSentEvent]:
        item, status, text = f"msg_{call.id}", self._status(choices[0]), choices[0].text
        part = OutputText(text=text)
        message = OutputMessage(id=item, status=status, content=[part])
        return [self._event(TextDoneEvent, "response.output_text.done", item_id=item, text=text),
                self._event(ContentPartEvent, "response.content_part.done", item_id=item, part=part),
                self._event(OutputItemEvent, "response.output_item.done", item=message),
                self._event(ResponseEvent, f"response.{status}", response=self._object(call, status, [message], usage))]

    def failed(self, call: Call, err: APIError) -> List[ServerSentEvent]:
        return [self._event(ErrorEvent, "error", code=err.code, message=err.message, param=err.param),
                self._event(ResponseEvent, "response.failed", response=self._object(call, "failed", [], error=err))]


def _input_details(usage: Usage) -> InputTokensDetails:
    """The Responses API's name for usage.prompt_tokens_details (cached prompt tokens)."""
    details = usage.prompt_tokens_details
    return InputTokensDetails(cached_tokens=details.cached_tokens if details else 0)
