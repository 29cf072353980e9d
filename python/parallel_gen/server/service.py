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
import hashlib
import json
import logging
import os
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Dict, List, Optional, Tuple, Union

import anyio
from starlette.requests import Request

from ..result_cache import model_fingerprint
from ..chat import checked_conversation
from ..errors import ErrorCode, Failure, ParamError, ParamTypeError
from ..core.inputs import PreparedPrompt, prepare_all
from ..model import Model
from ..params import SamplingParams, SeedRule
from ..results import Output, TokenLogprobs, ToolCall
from ..core.collector import Collector
from ..core.runner import Item
from ..stream import WHOLE, AsyncStreamIterator, StreamEvent, stream_collector
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
    """Where one choice (prompt i, sample j) stands: its events so far, and once finished
    its whole Output as the stream's collector assembled it (tool calls read)."""

    index: int
    events: int = 0
    """Stream events of this choice so far."""
    tokens: int = 0
    finish_reason: Optional[str] = None
    failure: Optional[Failure] = None
    output: Optional[Output] = None
    """Once finished: the whole output (with tools offered: its calls and content read)."""
    event_offset: int = 0
    """Characters of the tokens before the current event's (completions' logprobs offsets)."""
    stop_reason: Union[str, int, None] = None
    streamed: int = 0
    """Characters of the text already streamed as content (a stream with tools holds back
    what may be the start of a call)."""
    pending: str = ""
    """The text after the streamed part, while it may still stream (see hold_back)."""
    holding: bool = False
    """A call may have started: nothing more streams as content until the reply is read."""
    _offset: int = 0  # characters of every token so far

    def hold_back(self, plan: ToolPlan, text: str) -> str:
        """Of ``text``, this event's, what streams now as content: what is surely not a
        call. Only the unsent tail is looked at (a marker's possible start), so a stream
        costs time linear in its length."""
        if self.holding:
            return ""
        pending = self.pending + text
        upto, self.holding = plan.stream_split(pending)
        out, self.pending = pending[:upto], ("" if self.holding else pending[upto:])
        self.streamed += upto
        return out

    def sent_text(self) -> str:
        """The text streamed as content so far (once finished)."""
        return self.text[:self.streamed]

    @property
    def text(self) -> str:
        """The whole text, once finished ("" before)."""
        return "" if self.output is None else self.output.text

    @property
    def token_ids(self) -> List[int]:
        return [] if self.output is None else self.output.token_ids

    @property
    def logprobs(self) -> Optional[List[TokenLogprobs]]:
        """Every token's, when asked for, once finished."""
        return None if self.output is None else self.output.logprobs

    @property
    def tool_calls(self) -> Optional[List[ToolCall]]:
        """With tools offered, once finished: the reply's calls (None without tools)."""
        return None if self.output is None else self.output.tool_calls

    @property
    def content(self) -> Optional[str]:
        """With tools offered, once finished: the reply's text besides its calls."""
        return None if self.output is None else self.output.content


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
    admission: Optional["Admission"] = None
    """Its hold on the queue bound, taken before any costly work (see Service.admit)."""
    fingerprint: Optional[str] = None
    """The answers' system_fingerprint (see Service.fingerprint)."""
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


class Admission:
    """A request's hold on ``sequences`` of the server's queue bound, from before its call
    is built (so a refused request costs no rendering, tokenizing or grammar work) until
    :meth:`release`."""

    def __init__(self, service: "Service", sequences: int) -> None:
        self.service = service
        self.sequences = sequences
        self.running = False  # a token came: counted as running, no longer waiting
        self.released = False
        self.let_key_go: Callable[[], None] = _nothing  # the caller's key's hold (a keyed server)
        service.in_flight += sequences
        service.metrics.requests_waiting.inc()

    def started(self) -> None:
        if not self.running and not self.released:
            self.running = True
            self.service.metrics.requests_waiting.dec()
            self.service.metrics.requests_running.inc()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.service.in_flight -= self.sequences
        (self.service.metrics.requests_running if self.running else self.service.metrics.requests_waiting).dec()
        self.let_key_go()


KeyHold = Callable[[int], Awaitable[Callable[[], None]]]
"""Holds a number of sequences for the caller's API key (429 when its limits refuse) and
returns what lets them go: the gateway's admission, bound to the key."""


def _nothing() -> None:
    pass


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
        self.fingerprint = system_fingerprint(model)
        self.template: Optional[ChatTemplate] = None
        self.template_error: Optional[str] = None
        try:
            self.template = ChatTemplate(model, settings.chat_template)
        except (ValueError, TypeError) as e:
            self.template_error = str(e)

    # -- building calls ------------------------------------------------------------------
    async def completion_call(self, rid: str, body: CompletionRequest, key: Optional[KeyHold] = None) -> Call:
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
        admission = await self.admit(self._sequences(len(prompts), body.n), key)
        try:
            params = await anyio.to_thread.run_sync(self._params, body, body.max_tokens, body.logprobs)
            call = await self._call(rid, "completions", prompts, params, body)
        except BaseException:
            admission.release()
            raise
        call.admission = admission
        return call

    async def chat_call(self, rid: str, body: ChatCompletionRequest, key: Optional[KeyHold] = None) -> Call:
        if self.template is None:
            raise APIError(400, f"this model cannot chat: {self.template_error} (start the server with "
                                "--chat-template)", param="messages", code="no_chat_template")
        admission = await self.admit(self._sequences(1, body.n), key)
        try:
            call = await self._chat_call(rid, body, self.template)
        except BaseException:
            admission.release()
            raise
        call.admission = admission
        return call

    async def _chat_call(self, rid: str, body: ChatCompletionRequest, template: ChatTemplate) -> Call:
        try:  # the in-process rule (chat_parallel's), errors naming the field; schemas take a while to convert
            request = await anyio.to_thread.run_sync(tool_request, body.tools, body.tool_choice,
                                                     body.parallel_tool_calls)
        except (ParamError, ParamTypeError) as e:
            raise invalid_value(e) from None
        try:  # building the tools' grammar and rendering a long conversation take a while: not on the loop
            plan = await anyio.to_thread.run_sync(ToolPlan, template, request)
        except ValueError as e:
            raise APIError(400, str(e), param="tools", code="invalid_value") from None
        try:  # a history's tool-call arguments are parsed here: that too can take a while
            prompt = await anyio.to_thread.run_sync(_render, plan, [m.to_dict() for m in body.messages])
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
            schema = fmt.schema_ if fmt.schema_ is not None else {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format.json_schema is required when type is 'json_schema'",
                               param="response_format.json_schema", code="missing_field")
            schema = fmt.json_schema.schema_
        # A JSON schema becomes a grammar inside SamplingParams: large ones take a while.
        params = await anyio.to_thread.run_sync(self._chat_params, body, max_tokens, logprobs, schema, plan, template)
        tools = plan if request is not None else None
        call = await self._call(rid, "chat", [prompt], params, body, tools)
        call.plan = tools
        return call

    def _chat_params(self, body: ChatCompletionRequest, max_tokens: Optional[int], logprobs: Optional[int],
                     schema: Optional[dict], plan: ToolPlan, template: ChatTemplate) -> SamplingParams:
        params = self._params(body, max_tokens, logprobs, schema)
        try:
            return plan.params(template.add_stops(params))
        except ValueError as e:
            raise APIError(400, str(e), param="tools", code="invalid_value") from None

    def _sequences(self, prompts: int, n: int) -> int:
        """The sequences a request asks for, refused (400) when no server state could hold them."""
        s = self.settings
        if n > s.max_n:
            raise APIError(400, f"n={n}: at most {s.max_n} completions per prompt on this server",
                           param="n", code="invalid_value")
        if prompts > s.max_prompts:
            raise APIError(400, f"prompt: {prompts} prompts in one request; this server takes at most "
                                f"{s.max_prompts}", param="prompt", code="invalid_value")
        if prompts * n > self.capacity:
            raise APIError(400, f"{prompts} prompts x n={n} = {prompts * n} sequences: more "
                                f"than this server ever holds ({self.capacity}); split the request",
                           param="n", code="invalid_value")
        return prompts * n

    def _params(self, body: RequestBody, max_tokens: Optional[int], logprobs: Optional[int],
                response_schema: Optional[dict] = None) -> SamplingParams:
        """The request's SamplingParams: fields it sets, SamplingParams' defaults for the rest."""
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

    async def _call(self, rid: str, endpoint: str, prompts: List[str], base: SamplingParams, body: RequestBody,
                    tools: Optional[ToolPlan] = None) -> Call:
        ignored = body.ignored_fields()
        if ignored:
            logger.info("request %s: ignoring unsupported fields %s", rid, ", ".join(ignored))
        # Seeding every prompt's params, tokenizing, the engine's checks and the grammar
        # check can take a while (256 prompts...): off the loop.
        prepared, params, (collector, items) = await anyio.to_thread.run_sync(self._prepare, endpoint, prompts, base,
                                                                              tools)
        call = Call(rid, endpoint, prompts, params, base.n, [len(p.tokens) for p in prepared],
                    fingerprint=self.fingerprint)
        # A whole response needs its sequences' first tokens (time to first token) and ends only.
        interval = self.settings.stream_interval if body.stream else WHOLE
        call.stream = AsyncStreamIterator(collector, items, request_id=rid, stream_interval=interval)
        return call

    def _prepare(self, endpoint: str, prompts: List[str], base: SamplingParams, tools: Optional[ToolPlan]
                 ) -> Tuple[List[PreparedPrompt], List[SamplingParams], Tuple[Collector, List[Item]]]:
        """The prompts tokenized once, refused with the engine's own rule when one cannot
        run, their params, and the stream's collector (which checks the params against the
        model; it keeps each finished output, read for ``tools``) with its items."""
        rule = SeedRule(base.seed)  # as generate_parallel does with one seed for a call: prompt i uses seed + i
        params = [rule.apply(base, i) for i in range(len(prompts))]
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
            return prepared, params, stream_collector(self.model, prepared, params, tools=tools, keep_outputs=True)
        except (ParamError, ParamTypeError) as e:  # what only the model can check: token ids, grammars
            raise invalid_value(e) from None


    # -- running ------------------------------------------------------------------------
    async def admit(self, sequences: int, key: Optional[KeyHold] = None) -> Admission:
        """Holds ``sequences`` against the queue bound, then the caller's key's limits (429
        when either refuses), before the request's costly work (rendering, tokenizing,
        grammars): a refused request costs none of it. The caller releases the Admission
        once the call has ended."""
        if self.in_flight + sequences > self.capacity:
            waiting = max(0, self.in_flight - self.model.n_parallel)
            raise APIError(429, f"the server is busy: {waiting} sequences are waiting for a slot (limit "
                                f"{self.settings.max_queue}); retry later", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after)})
        admission = Admission(self, sequences)
        if key is not None:
            try:
                admission.let_key_go = await key(sequences)
            except BaseException:
                admission.release()
                raise
        return admission

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
                    if call.admission is not None:
                        call.admission.started()
                    self.metrics.time_to_first_token.labels(call.endpoint).observe(call.first_token_at - call.started)
                c = call.choice(ev)
                c.events += 1
                c.tokens += len(ev.token_ids)
                if ev.finished:
                    # The collector's whole output: with tools, its calls were read there (off the loop).
                    c.output = stream.take_output(ev.index, ev.sample)
                    c.finish_reason, c.stop_reason = ev.finish_reason, ev.stop_reason
                    if ev.error is not None:
                        c.failure = Failure(ErrorCode(ev.error_code or ErrorCode.ABORTED), ev.error)
                    elif c.output is not None:
                        c.finish_reason = c.output.finish_reason
                    call.cached[ev.index] = min(call.cached.get(ev.index, ev.cached_tokens), ev.cached_tokens)
                if ev.logprobs is not None:
                    c.event_offset = c._offset
                    c._offset += sum(len(t.token) for t in ev.logprobs)
                yield c, ev
        finally:
            await stream.aclose()

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


def system_fingerprint(model: Model) -> str:
    """What OpenAI's system_fingerprint says: it changes when the answers to the same
    request may (another model file, a setting that changes numerics, another version)."""
    from .. import __version__

    weights = model_fingerprint(model.path) if os.path.isfile(model.path) else model.path  # (a borrowed Llama's)
    recipe = json.dumps({"version": __version__, "model": weights,
                         "numerics": model.numerics()}, sort_keys=True, default=repr)
    return "fp_" + hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _render(plan: ToolPlan, messages: List[dict]) -> str:
    return plan.render(checked_conversation("messages", messages))


def failed_choice(c: Choice) -> APIError:
    """The error response for a choice the engine could not complete."""
    return failure_error(c.failure or Failure(ErrorCode.ABORTED, "generation failed"))


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
