"""From a validated HTTP request to the Model's running batch and back.

A request becomes a :class:`Call`: its prompts (chat messages already rendered), one
SamplingParams per prompt, and its token counts. Jobs are admitted against a bound on
the sequences the server holds (``n_parallel + max_queue``), run through the same
streaming path as :func:`parallel_gen.astream_parallel`, and are cancelled (their KV
freed) the moment their client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Dict, List, Optional, Tuple, Union

import anyio
from starlette.requests import Request

from ..chat import checked_conversation
from ..errors import ErrorCode, Failure, ParamError, ParamTypeError
from ..inputs import PreparedPrompt, prepare_all
from ..model import Model
from ..params import SamplingParams, SeedRule
from ..results import Output, TokenLogprobs, ToolCall
from ..stream import AsyncStreamIterator, StreamEvent, StreamState
from ..templates import ChatTemplate
from ..tools import ToolPlan, tool_request
from .errors import APIError, failure_error, invalid_value
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .settings import ServerSettings

logger = logging.getLogger("parallel_gen")

RequestBody = Union[CompletionRequest, ChatCompletionRequest]
"""The body of either endpoint (the fields they share are read from it)."""


@dataclass
class Choice:
    """What one choice (prompt i, sample j) has produced so far."""

    index: int
    text: List[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: Optional[str] = None
    failure: Optional[Failure] = None
    logprobs: Optional[List[TokenLogprobs]] = None
    """Every token's so far, when asked for (each stream event adds its tokens')."""
    event_offset: int = 0
    """Characters of the tokens before the current event's (completions' logprobs offsets)."""
    token_ids: List[int] = field(default_factory=list)
    stop_reason: Union[str, int, None] = None
    tool_calls: Optional[List[ToolCall]] = None
    """With tools offered, once finished: the reply's calls (see ToolPlan.read)."""
    content: Optional[str] = None
    """With tools offered, once finished: the reply's text besides its calls."""
    streamed: int = 0
    """Characters of the text already streamed as content (a stream with tools holds back
    what may be the start of a call)."""
    _offset: int = 0  # characters of every token so far


@dataclass
class Call:
    """One HTTP request's generation work."""

    id: str
    endpoint: str
    prompts: List[str]
    params: List[SamplingParams]
    n: int
    prompt_tokens: List[int]
    stream: Optional[AsyncStreamIterator] = None  # created once the request is validated
    plan: Optional[ToolPlan] = None
    """A chat call's tools (None without): how its replies are read as tool calls."""
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    first_token_at: Optional[float] = None
    choices: Dict[int, Choice] = field(default_factory=dict)
    cached: Dict[int, int] = field(default_factory=dict)
    """Per prompt: its tokens reused by every sample (the prompt cache, a shared prefix)."""

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.n

    @property
    def usage_prompt_tokens(self) -> int:
        return sum(self.prompt_tokens)

    @property
    def usage_cached_tokens(self) -> int:
        return sum(self.cached.values())

    @property
    def usage_completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices.values())

    def choice(self, ev: StreamEvent) -> Choice:
        """The choice an event belongs to (index prompt * n + sample, as OpenAI numbers them)."""
        k = ev.index * self.n + ev.sample
        c = self.choices.get(k)
        if c is None:
            c = self.choices[k] = Choice(k)
        return c


class ClientGone(Exception):
    """The client closed its connection before the response was ready."""


class Service:
    """The server's side of a Model: admission, call construction, running, accounting."""

    def __init__(self, model: Model, settings: ServerSettings, metrics: Metrics) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.in_flight = 0  # sequences of admitted calls not finished yet (event loop only)
        self.capacity = model.n_parallel + settings.max_queue
        self.template: Optional[ChatTemplate] = None
        self.template_error: Optional[str] = None
        try:
            self.template = ChatTemplate(model, settings.chat_template)
        except (ValueError, TypeError) as e:
            self.template_error = str(e)

    # -- building calls ------------------------------------------------------------------
    async def completion_call(self, rid: str, body: CompletionRequest) -> Call:
        if body.echo:
            raise APIError(400, "echo=true is not supported: the response holds the completion only",
                           param="echo", code="unsupported")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, f"best_of={body.best_of} is not supported: ask for n completions and rank them "
                                "yourself (e.g. with logprobs)", param="best_of", code="unsupported")
        if body.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt=[]: give at least one prompt", param="prompt", code="invalid_value")
        params = await anyio.to_thread.run_sync(self._params, body, body.max_tokens, body.logprobs)
        return await self._call(rid, "completions", prompts, params, body)

    async def chat_call(self, rid: str, body: ChatCompletionRequest) -> Call:
        if self.template is None:
            raise APIError(400, f"this model cannot chat: {self.template_error} (start the server with "
                                "--chat-template)", param="messages", code="no_chat_template")
        template = self.template
        try:  # the in-process rule (chat_parallel's), errors naming the field; schemas take a while to convert
            request = await anyio.to_thread.run_sync(tool_request, body.tools, body.tool_choice,
                                                     body.parallel_tool_calls)
        except (ParamError, ParamTypeError) as e:
            raise invalid_value(e) from None
        try:  # building the tools' grammar and rendering a long conversation take a while: not on the loop
            plan = await anyio.to_thread.run_sync(ToolPlan, template, request)
        except ValueError as e:
            raise APIError(400, str(e), param="tools", code="invalid_value") from None
        try:
            messages = checked_conversation("messages", [m.to_dict() for m in body.messages])
            prompt = await anyio.to_thread.run_sync(plan.render, messages)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, f"top_logprobs={body.top_logprobs} needs logprobs=true", param="top_logprobs",
                           code="invalid_value")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        schema = None
        fmt = body.response_format
        if fmt is not None and fmt.type == "json_object":
            schema = {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format.json_schema is required when type is 'json_schema'",
                               param="response_format.json_schema", code="missing_field")
            schema = fmt.json_schema.schema_
        # A JSON schema becomes a grammar inside SamplingParams: large ones take a while.
        params = await anyio.to_thread.run_sync(self._params, body, max_tokens, logprobs, schema)
        try:
            params = plan.params(template.add_stops(params))
        except ValueError as e:
            raise APIError(400, str(e), param="tools", code="invalid_value") from None
        call = await self._call(rid, "chat", [prompt], params, body)
        call.plan = plan if request is not None else None
        return call

    def _params(self, body: RequestBody, max_tokens: Optional[int], logprobs: Optional[int],
                response_schema: Optional[dict] = None) -> SamplingParams:
        """The request's SamplingParams: fields it sets, SamplingParams' defaults for the rest."""
        s = self.settings
        if body.n > s.max_n:
            raise APIError(400, f"n={body.n}: at most {s.max_n} completions per prompt on this server",
                           param="n", code="invalid_value")
        kw: Dict[str, object] = {"n": body.n, "ignore_eos": body.ignore_eos, "cache_prompt": body.cache_prompt}
        # None: until the sequence's context is full, as OpenAI does for chat.
        kw["max_tokens"] = self.model.n_ctx if max_tokens is None else max_tokens
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repeat_penalty", "grammar", "json_schema"):
            value = getattr(body, name)
            if value is not None:
                kw[name] = value
        if response_schema is not None:
            if body.json_schema is not None or body.grammar is not None:
                raise APIError(400, "response_format cannot be combined with grammar or json_schema",
                               param="response_format", code="invalid_value")
            kw["json_schema"] = response_schema
        if body.stop is not None:
            kw["stop"] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
        if logprobs is not None:
            kw["logprobs"] = logprobs
        if body.logit_bias:
            bias = {}
            for key, value in body.logit_bias.items():
                try:
                    bias[int(key)] = float(value)
                except ValueError:
                    raise APIError(400, f"logit_bias key {key!r}: must be a token id (an integer)",
                                   param="logit_bias", code="invalid_value") from None
            kw["logit_bias"] = bias
        if body.seed is not None:
            kw["seed"] = body.seed
        try:
            return SamplingParams(**kw)  # type: ignore[arg-type]
        except (ParamError, ParamTypeError) as e:
            raise invalid_value(e) from None

    async def _call(self, rid: str, endpoint: str, prompts: List[str], base: SamplingParams, body: RequestBody) -> Call:
        s = self.settings
        if len(prompts) > s.max_prompts:
            raise APIError(400, f"prompt: {len(prompts)} prompts in one request; this server takes at most "
                                f"{s.max_prompts}", param="prompt", code="invalid_value")
        if len(prompts) * base.n > self.capacity:
            raise APIError(400, f"{len(prompts)} prompts x n={base.n} = {len(prompts) * base.n} sequences: more "
                                f"than this server ever holds ({self.capacity}); split the request",
                           param="n", code="invalid_value")
        ignored = body.ignored_fields()
        if ignored:
            logger.info("request %s: ignoring unsupported fields %s", rid, ", ".join(ignored))
        # As generate_parallel does with one seed for a call: prompt i uses seed + i.
        rule = SeedRule(base.seed)
        params = [rule.apply(base, i) for i in range(len(prompts))]
        # Tokenizing, the engine's checks and the grammar check can take a while: off the loop.
        prepared, state = await anyio.to_thread.run_sync(self._prepare, endpoint, prompts, params)
        call = Call(rid, endpoint, prompts, params, base.n, [len(p.tokens) for p in prepared])
        call.stream = AsyncStreamIterator(state, request_id=rid)
        return call

    def _prepare(self, endpoint: str, prompts: List[str], params: List[SamplingParams]
                 ) -> Tuple[List[PreparedPrompt], StreamState]:
        """The prompts tokenized once, refused with the engine's own rule when one cannot
        run, and the stream's state (which checks the params against the model)."""
        prepared = prepare_all(self.model, prompts)
        for i, p in enumerate(prepared):
            failure = p.failure or self.model.check_tokens(p.tokens)
            if failure is not None:
                name = "messages" if endpoint == "chat" else "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                if failure.code is ErrorCode.PROMPT_TOO_LONG:
                    failure = Failure(failure.code, f"{name} has {len(p.tokens)} tokens; this server's context holds "
                                                    f"{self.model.n_ctx} tokens per sequence, prompt and completion "
                                                    "together")
                elif failure.code is ErrorCode.EMPTY_PROMPT:
                    failure = Failure(failure.code, f"{name} is empty: it has no tokens")
                raise failure_error(failure, param=name)
        try:
            return prepared, StreamState(self.model, prepared, params)
        except (ParamError, ParamTypeError) as e:  # what only the model can check: token ids, grammars
            raise invalid_value(e) from None


    # -- running ------------------------------------------------------------------------
    def admit(self, call: Call) -> Callable[[], None]:
        """Holds the call's sequences against the queue bound (429 when they do not fit);
        returns the function that lets them go, to be called once the call has ended."""
        if self.in_flight + call.sequences > self.capacity:
            waiting = max(0, self.in_flight - self.model.n_parallel)
            raise APIError(429, f"the server is busy: {waiting} sequences are waiting for a slot (limit "
                                f"{self.settings.max_queue}); retry later", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after)})
        self.in_flight += call.sequences
        self.metrics.requests_waiting.inc()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.in_flight -= call.sequences
            if call.first_token_at is None:
                self.metrics.requests_waiting.dec()
            else:
                self.metrics.requests_running.dec()

        return release

    async def events(self, call: Call) -> AsyncIterator[Tuple[Choice, StreamEvent]]:
        """The call's stream events with their choices; the stream is closed (the engine's
        work cancelled) however the caller stops iterating."""
        stream = call.stream
        if stream is None:
            raise RuntimeError(f"request {call.id}: its call has no stream")
        try:
            async for ev in stream:
                if call.first_token_at is None and ev.token_ids:
                    call.first_token_at = time.perf_counter()
                    self.metrics.requests_waiting.dec()
                    self.metrics.requests_running.inc()
                    self.metrics.time_to_first_token.labels(call.endpoint).observe(call.first_token_at - call.started)
                c = call.choice(ev)
                c.text.append(ev.text)
                c.tokens += len(ev.token_ids)
                c.token_ids.extend(ev.token_ids)
                if ev.finished:
                    c.finish_reason, c.stop_reason = ev.finish_reason, ev.stop_reason
                    if ev.error is not None:
                        c.failure = Failure(ErrorCode(ev.error_code or ErrorCode.ABORTED), ev.error)
                    elif call.plan is not None:
                        self._read_tools(call.plan, c)
                    call.cached[ev.index] = min(call.cached.get(ev.index, ev.cached_tokens), ev.cached_tokens)
                if ev.logprobs is not None:  # extended in place: linear in the tokens, not quadratic
                    if c.logprobs is None:
                        c.logprobs = []
                    c.logprobs.extend(ev.logprobs)
                    c.event_offset = c._offset
                    c._offset += sum(len(t.token) for t in ev.logprobs)
                yield c, ev
        finally:
            await stream.aclose()

    def _read_tools(self, plan: ToolPlan, c: Choice) -> None:
        """A finished choice read as content and tool calls, as chat_parallel reads an Output."""
        out = plan.read(self.model, Output("".join(c.text), c.token_ids, c.finish_reason or "stop", c.stop_reason))
        c.tool_calls, c.content, c.finish_reason = out.tool_calls, out.content, out.finish_reason

    async def collect(self, call: Call, request: Request) -> None:
        """Runs the call to the end; raises ClientGone (the work cancelled) if the client leaves."""
        async def consume() -> None:
            async for c, ev in self.events(call):
                if ev.finished and ev.finish_reason == "error":
                    raise failed_choice(c)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (consumer, watcher):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        if consumer not in done:
            raise ClientGone()
        consumer.result()  # its exception, if any

    def finish(self, call: Call, status: int) -> None:
        """Accounting and the request's closing log line."""
        seconds = time.perf_counter() - call.started
        m = self.metrics
        m.requests.labels(call.endpoint, str(status)).inc()
        m.request_latency.labels(call.endpoint).observe(seconds)
        m.prompt_tokens.inc(call.usage_prompt_tokens)
        m.cached_prompt_tokens.inc(call.usage_cached_tokens)
        m.generation_tokens.inc(call.usage_completion_tokens)
        reasons = Tally(c.finish_reason or "cancelled" for c in call.choices.values())
        for reason, count in reasons.items():
            m.finished.labels(reason).inc(count)
        logger.info("request %s: %s %d, %d prompts x n=%d, %d prompt + %d completion tokens, %.2f s, finish %s",
                    call.id, call.endpoint, status, len(call.prompts), call.n, call.usage_prompt_tokens,
                    call.usage_completion_tokens, seconds,
                    " ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "-")


def failed_choice(c: Choice) -> APIError:
    """The error response for a choice the engine could not complete."""
    return failure_error(c.failure or Failure(ErrorCode.ABORTED, "generation failed"))


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
