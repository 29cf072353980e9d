"""The one reader of engine events: a request's events in, its outputs assembled.

Every surface reaches the engine through a client (client.py) and hands what comes back
to a :class:`Collector`, which is the only code that reads engine events: it keeps the
prompts of one client's requests, turns each finished sequence into its public result
(an :class:`~parallel_gen.results.Output`, with its tool calls read when the call offered
tools; or a scoring prompt's :class:`~parallel_gen.results.Score` list), gathers them
into per-prompt results (:meth:`take`, :meth:`take_scored`, :meth:`completed`), and, for
streams, turns deltas into :class:`~parallel_gen.results.StreamEvent` (:meth:`next_event`,
:meth:`anext_event`, the asyncio twin). The waiting loops live here too: :meth:`drain`
(a whole request), :meth:`step` (one event, for look-ahead runs).
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Deque, Dict, List, Optional, Set, Tuple

from .client import AsyncClient, Client, Routed
from ..errors import ErrorCode, Failure, GenerationError
from .events import Progress, RequestDone, SequenceDelta, SequenceFinished, SequenceResult, public_logprobs
from .inputs import ScoringPrompt
from ..results import Completion, Output, Score, StreamEvent, TokenLogprobs

if TYPE_CHECKING:
    from ..model import Model
    from ..tools import ToolPlan

# Called after engine steps with (prompts done, prompts expected, tokens generated so far).
StepCallback = Callable[[int, int, int], None]


@dataclass(frozen=True)
class Scored:
    """One scoring prompt's result: a Score per continuation, or why it has none."""

    scoring_prompt: Optional[ScoringPrompt]
    scores: List[Score]
    failure: Optional[Failure] = None
    prompt_tokens: int = 0


@dataclass
class _Prompt:
    """What one prompt of the collector's requests has produced so far."""

    text: str
    outputs: List[Optional[Output]]
    missing: int
    prompt_tokens: int = 0
    scores: bool = False
    """A scoring prompt: its result is a :class:`Scored`."""
    scoring: Optional[ScoringPrompt] = None
    scored: Optional[Scored] = None


@dataclass
class _Sent:
    """What a streamed sequence has sent in deltas (kept outputs: their logprobs too)."""

    bytes: int = 0
    tokens: int = 0
    logprobs: List[TokenLogprobs] = field(default_factory=list)


class Collector:
    """Reads the engine events of one client's requests and assembles their outputs.

    Args:
        model: the Model the requests run on (its token texts, for logprobs).
        tools: the call's tools: every finished output is read for tool calls here (the
            one place they are read), content and finish_reason "tool_calls" set.
        stream: turn deltas into StreamEvents (:meth:`next_event`) instead of gathering
            per-prompt results.
        keep_outputs: a stream also keeps each finished sequence's whole Output (read
            for tools), for :meth:`take_output` (the server's responses).
        on_step: progress after engine steps (requests submitted with ``ticks``).
        on_done: called with a prompt's index when the engine has finished its last
            sequence (not for :meth:`fail` or :meth:`put`).
    """

    def __init__(self, model: "Model", *, tools: Optional["ToolPlan"] = None, stream: bool = False,
                 keep_outputs: bool = False, on_step: Optional[StepCallback] = None,
                 on_done: Optional[Callable[[int], None]] = None) -> None:
        self.model = model
        self.tools = tools if tools is not None and tools.request is not None else None
        self.stream = stream
        self.keep_outputs = keep_outputs
        self.on_step = on_step
        self.on_done = on_done
        self._prompts: Dict[int, _Prompt] = {}
        self._sent: Dict[Tuple[int, int], _Sent] = {}
        self._kept: Dict[Tuple[int, int], Output] = {}
        self.ready_events: Deque[StreamEvent] = collections.deque()
        self.expected = 0
        """Prompts expected so far (the total of progress reports)."""
        self.n_done = 0
        """Prompts whose every sequence has a result."""
        self.tokens = 0
        """Tokens of the finished sequences: generated ones; a scoring sequence's prompt
        and continuations (tokens decoded, for tokens/s)."""
        self.reused_kv: Set[int] = set()
        """Prompts whose prefill started from KV decoded before (the prompt cache, a shared
        prefix): their outputs may differ slightly from a whole prefill's (see cacheable_result)."""
        self.done = False
        """A stream's request has ended (RequestDone)."""

    # -- what the requests hold -----------------------------------------------------------
    def expect(self, i: int, prompt: str, n: int, prompt_tokens: int = 0) -> None:
        """Prompt ``i`` has ``n`` sequences coming (or failing, :meth:`fail`)."""
        self._prompts[i] = _Prompt(prompt, [None] * n, n, prompt_tokens)
        self.expected += 1

    def expect_scores(self, i: int, sp: Optional[ScoringPrompt]) -> None:
        """Prompt ``i`` is one scoring sequence (None: a work that has no scoring prompt);
        one without continuations is done at once, with no scores."""
        self.expect(i, "" if sp is None else sp.prompt, 1, 0 if sp is None else len(sp.prepared.tokens))
        p = self._prompts[i]
        p.scores, p.scoring = True, sp
        if sp is not None and not sp.continuations:
            self._settle(i, Scored(sp, []))

    def fail(self, i: int, failure: Failure) -> None:
        """Prompt ``i`` cannot run: each of its sequences fails with ``failure``."""
        p = self._prompts[i]
        if p.scores:
            sp = p.scoring
            self._settle(i, Scored(sp, failed_scores(sp, failure) if sp is not None else [], failure))
            return
        if self.stream:
            self.ready_events.extend(StreamEvent(i, "", [], True, "error", j, None, failure.message,
                                                 error_code=failure.code) for j in range(len(p.outputs)))
        p.outputs = [Output.failed(failure) for _ in p.outputs]
        if self.keep_outputs:
            self._kept.update({(i, j): o for j, o in enumerate(p.outputs)})
        self._settle(i)

    def put(self, i: int, c: Completion) -> None:
        """A whole Completion from elsewhere (the result cache)."""
        p = self._prompts[i]
        p.outputs, p.prompt_tokens = list(c.outputs), c.prompt_tokens
        self._settle(i)

    def ready(self, i: int) -> bool:
        p = self._prompts.get(i)
        return p is not None and p.missing == 0

    def take(self, i: int) -> Completion:
        """Completion ``i`` (ready), forgotten here."""
        self.reused_kv.discard(i)
        p = self._prompts.pop(i)
        return Completion(i, p.text, p.outputs, p.prompt_tokens)  # type: ignore[arg-type]

    def take_scored(self, i: int) -> Scored:
        """Scoring prompt ``i``'s result (ready), forgotten here."""
        self.reused_kv.discard(i)
        scored = self._prompts.pop(i).scored
        if scored is None:
            raise RuntimeError(f"prompt {i} is not a finished scoring prompt")
        return scored

    def take_output(self, index: int, sample: int) -> Optional[Output]:
        """A kept stream's finished sequence, read for tools (None: not finished or not kept)."""
        return self._kept.pop((index, sample), None)

    def completed(self) -> List[Completion]:
        """Every ready Completion so far, in index order (kept here)."""
        return [Completion(i, p.text, list(p.outputs), p.prompt_tokens)  # type: ignore[arg-type]
                for i, p in sorted(self._prompts.items()) if p.missing == 0]

    # -- reading events -------------------------------------------------------------------
    def handle(self, routed: Routed) -> Optional[StreamEvent]:
        """One engine event applied; a stream's StreamEvent for it (None: nothing to show)."""
        event = routed.event
        if isinstance(event, SequenceDelta):
            return self._delta(event)
        if isinstance(event, SequenceFinished):
            return self._finished(event.result)
        if isinstance(event, Progress):
            if self.on_step is not None:
                self.on_step(self.n_done, self.expected, event.generated_tokens)
        elif isinstance(event, RequestDone):
            self.done = True
            if self.on_step is not None:  # the request ends before its last step's Progress
                self.on_step(self.n_done, self.expected, routed.request.counters.generated_tokens)
        return None

    def drain(self, client: Client) -> None:
        """Reads events until every request of ``client`` has ended; a request that ended
        badly raises its GenerationError carrying the completions finished so far."""
        try:
            while client.in_flight:
                self.handle(client.next())
        except GenerationError as e:
            e.results = self.completed()
            raise

    def step(self, client: Client) -> None:
        """Reads and applies one event (a look-ahead run refills between events)."""
        self.handle(client.next())

    def next_event(self, client: Client) -> Optional[StreamEvent]:
        """A stream's next StreamEvent, reading events as needed; None once it has ended."""
        while True:
            if self.ready_events:
                return self.ready_events.popleft()
            if self.done:
                return None
            ev = self.handle(client.next())
            if ev is not None:
                return ev

    async def anext_event(self, client: AsyncClient) -> Optional[StreamEvent]:
        """:meth:`next_event` inside an event loop; reading a finished output's tool calls
        (a long reply takes a while) runs off the loop."""
        while True:
            if self.ready_events:
                return self.ready_events.popleft()
            if self.done:
                return None
            routed = await client.next()
            if self.tools is not None and isinstance(routed.event, SequenceFinished):
                ev = await asyncio.get_running_loop().run_in_executor(None, self.handle, routed)
            else:
                ev = self.handle(routed)
            if ev is not None:
                return ev

    # -- assembling -----------------------------------------------------------------------
    def _delta(self, event: SequenceDelta) -> Optional[StreamEvent]:
        d = event.delta
        sent = self._sent.setdefault((d.index, d.sample), _Sent())
        sent.bytes += len(d.text)
        sent.tokens += len(d.token_ids)
        logprobs = public_logprobs(d.token_ids, d.logprobs, self.model.token_text)
        if self.keep_outputs and logprobs is not None:
            sent.logprobs.extend(logprobs)
        return StreamEvent(d.index, d.text.decode("utf-8", "replace"), list(d.token_ids), False, sample=d.sample,
                           logprobs=logprobs)

    def _finished(self, r: SequenceResult) -> Optional[StreamEvent]:
        p = self._prompts.get(r.index)
        if p is not None and p.scoring is not None:
            self.tokens += r.prompt_tokens + len(r.token_ids)
            failure = Failure(r.error_code or ErrorCode.ABORTED, r.error) if r.error else None
            self._settle(r.index, Scored(p.scoring, prompt_scores(p.scoring, r), failure, r.prompt_tokens),
                         finished=True)
            return None
        self.tokens += len(r.token_ids)
        if not self.stream:
            if p is None:
                raise GenerationError(f"internal error: the engine returned prompt {r.index}, which was not sent")
            p.outputs[r.sample] = self._read(r.to_output(self.model.token_text))
            p.prompt_tokens = r.prompt_tokens
            if r.sample == 0 and r.cached_tokens > 0:  # (later samples share sample 0's prefill)
                self.reused_kv.add(r.index)
            p.missing -= 1
            if p.missing == 0:
                self._settle(r.index, finished=True)
            return None
        sent = self._sent.pop((r.index, r.sample), _Sent())
        raw = r.logprobs[sent.tokens:] if r.logprobs is not None else None
        rest = public_logprobs(r.token_ids[sent.tokens:], raw, self.model.token_text)
        if self.keep_outputs:
            logprobs = None if rest is None else sent.logprobs + rest
            out = Output(r.text.decode("utf-8", "replace"), list(r.token_ids), r.finish_reason, r.stop_reason,
                         r.error, logprobs, r.error_code)
            self._kept[(r.index, r.sample)] = self._read(out)
        return StreamEvent(r.index, r.text[sent.bytes:].decode("utf-8", "replace"), r.token_ids[sent.tokens:],
                           True, r.finish_reason, r.sample, r.stop_reason, r.error, rest, r.error_code,
                           r.cached_tokens)

    def _read(self, output: Output) -> Output:
        """The one place an output's tool calls are read (unchanged without tools)."""
        return output if self.tools is None else self.tools.read(self.model, output)

    def _settle(self, i: int, scored: Optional[Scored] = None, finished: bool = False) -> None:
        """Prompt ``i`` is ready; ``finished``: by the engine (on_done is told)."""
        p = self._prompts[i]
        p.missing = 0
        if scored is not None:
            p.scored = scored
        self.n_done += 1
        if finished and self.on_done is not None:
            self.on_done(i)


def prompt_scores(sp: ScoringPrompt, r: SequenceResult) -> List[Score]:
    """Splits one scoring sequence's result (continuations end to end) into Scores."""
    if r.error:
        return failed_scores(sp, Failure(r.error_code or ErrorCode.ABORTED, r.error))
    logprobs = [float(lp) for lp, _ in r.logprobs or []]
    tokens = r.token_ids
    out, at = [], 0
    for ids in sp.continuations:
        n = len(ids)
        if tokens[at:at + n] != ids:
            raise GenerationError(f"internal error: the engine scored tokens {tokens[at:at + n]}, not {ids}")
        lps = logprobs[at:at + n]
        out.append(Score(math.fsum(lps), lps, list(ids)))
        at += n
    return out


def failed_scores(sp: ScoringPrompt, failure: Failure) -> List[Score]:
    """One Score per continuation of ``sp``, each NaN with the failure's message and code."""
    return [Score(math.nan, [], list(ids), failure.message, failure.code) for ids in sp.continuations]
