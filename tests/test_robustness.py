"""Review findings (issue 31), in process: work done once (schema conversion, parameter
checks, detokenizing), bounded memory, parsers that never raise, the result cache against
the prompt cache, cancels never lost, and a forced tool choice that is one call."""

from __future__ import annotations

import asyncio
import collections
import json
import threading

import pytest

import parallel_gen as pg
from parallel_gen import constraints
from parallel_gen.core.client import AsyncClient
from parallel_gen.model import CHECKED_PARAMS_KEPT
from parallel_gen.params import SeedRule
from parallel_gen.results import Output
from parallel_gen.core.runner import Item, Request
from parallel_gen.templates import ChatTemplate
from parallel_gen.tools import FORMATS, GENERIC, ToolPlan, tool_request
from test_tools import HERMES, SCHEMAS, TOOLS, check_calls, user


def big_schema(fields=20, tag="x"):
    """A JSON schema of ``fields`` objects with bounded strings, enums, ranges and arrays:
    about 25 kB of grammar, a few milliseconds to convert (as the issue measured)."""
    props = {}
    for i in range(fields):
        props[f"{tag}_field_{i}"] = {"type": "object", "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "kind": {"type": "string", "enum": [f"{tag}_kind_{i}_{k}" for k in range(12)]},
            "score": {"type": "integer", "minimum": 0, "maximum": 1000},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
            "required": ["name", "kind", "score", "tags"]}
    return {"type": "object", "properties": props, "required": sorted(props)}


# -- 1. a schema is converted once per distinct schema ------------------------------------------
def test_a_schema_is_converted_once_per_distinct_schema():
    schema = big_schema(tag="once")
    before = constraints.schema_conversions()
    base = pg.SamplingParams(json_schema=schema, seed=1)
    rule = SeedRule(base.seed)
    params = [rule.apply(base, i) for i in range(256)]  # the server's and file jobs' per-prompt copies
    params += [p.replace(stop=("\n\n",), max_tokens=9) for p in params[:8]]
    params += [pg.SamplingParams(json_schema=big_schema(tag="once"), seed=i) for i in range(8)]  # equal, not same
    assert constraints.schema_conversions() - before == 1
    assert all(p.compiled_grammar == base.compiled_grammar for p in params)
    assert [p.seed for p in params[:3]] == [1, 2, 3]
    # A changed constraint is converted (and checked) again.
    other = base.replace(json_schema=big_schema(fields=3, tag="other"))
    assert constraints.schema_conversions() - before == 2 and other.compiled_grammar != base.compiled_grammar
    with pytest.raises(pg.ParamError, match="json_schema"):
        base.replace(json_schema="{not json")
    assert base.replace(grammar=None, json_schema=None, choices=("a", "b")).compiled_grammar.startswith("root ::=")


# -- 2. the model's parameter checks are bounded ------------------------------------------------
def test_parameter_checks_are_remembered_within_a_bound(smol):
    for k in range(CHECKED_PARAMS_KEPT + 40):
        assert smol.check_params(pg.SamplingParams(logit_bias={k % smol.n_vocab: -1.0})) is None
    assert len(smol._checked) == CHECKED_PARAMS_KEPT
    bad = pg.SamplingParams(logit_bias={smol.n_vocab + 5: 1.0})
    assert "vocabulary" in str(smol.check_params(bad)) and "vocabulary" in str(smol.check_params(bad))


# -- 3. deep JSON: the parsers never raise; a history's arguments are a clear error -------------
DEEP = 50_000


@pytest.mark.parametrize("fmt", list(FORMATS) + [GENERIC], ids=lambda f: f.name)
def test_parsers_do_not_raise_on_deeply_nested_json(fmt):
    deep = "[" * DEEP + "]" * DEEP
    args = '{"a": ' + deep + "}"
    texts = [deep, args, '{"tool_calls": [{"name": "f", "arguments": ' + args + "}]}",
             '<tool_call>{"name": "f", "arguments": ' + args + "}</tool_call>",
             "[TOOL_CALLS]f[ARGS]" + args, '<function=f>' + args + "</function>"]
    for text in texts:
        reply = fmt.parse(text)
        assert reply.calls == [] or all(json.loads(c.arguments) is not None for c in reply.calls)


def test_a_history_with_deeply_nested_arguments_is_a_value_error(smol):
    deep = '{"a": ' + "[" * DEEP + "]" * DEEP + "}"
    history = user("Hi") + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}]}]
    with pytest.raises(ValueError, match=r"arguments.*not valid JSON.*RecursionError"):
        pg.chat_parallel(smol, [history], tools=TOOLS, chat_template=HERMES, max_tokens=2)


# -- 6. the result cache stores only outputs of whole prefills ----------------------------------
def test_result_cache_leaves_out_prefills_that_reused_kv(smollm2_path, tmp_path):
    cache = pg.ResultCache(tmp_path / "rc")
    base = "The history of the city of Lyon, told in three short parts. Part one:"
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=512, n_threads=2, prompt_cache=True) as m:
        cold = pg.generate_parallel(m, [base], temperature=0, max_tokens=6, cache=cache)
        assert cold.stats.cached_prompt_tokens == 0 and len(cache) == 1  # decoded whole: stored
        warm = pg.generate_parallel(m, [base + " the Romans"], temperature=0, max_tokens=6, cache=cache)
        assert warm.stats.cached_prompt_tokens > 0  # resumed from the cached prefix...
        assert len(cache) == 1  # ...so not stored: its output depends on what ran before
        again = pg.generate_parallel(m, [base], temperature=0, max_tokens=6, cache=cache)
        assert again.stats.cache_hits == 1 and again[0].text == cold[0].text
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=512, n_threads=2, prompt_cache=False) as fresh:
        # What is stored is what a Model with a cold cache answers (greedy SmolLM2, decoded whole).
        want = pg.generate_parallel(fresh, [base + " the Romans"], temperature=0, max_tokens=6)
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=512, n_threads=2, prompt_cache=True) as m2:
        first = pg.generate_parallel(m2, [base + " the Romans"], temperature=0, max_tokens=6, cache=cache)
        assert first.stats.cache_hits == 0 and len(cache) == 2 and first[0].text == want[0].text
    cache.close()


def test_samples_of_a_whole_prefill_are_stored(smollm2_path, tmp_path):
    with pg.ResultCache(tmp_path / "rc") as cache, \
            pg.Model(smollm2_path, n_parallel=4, n_ctx=256, n_threads=2, prompt_cache=True) as m:
        r = pg.generate_parallel(m, ["Three colours:"], n=3, temperature=0.8, seed=5, max_tokens=4, cache=cache)
        assert len(r[0].outputs) == 3 and len(cache) == 1
        hit = pg.generate_parallel(m, ["Three colours:"], n=3, temperature=0.8, seed=5, max_tokens=4, cache=cache)
        assert hit.stats.cache_hits == 1 and [o.text for o in hit[0].outputs] == [o.text for o in r[0].outputs]


# -- 7. a reply's text read once --------------------------------------------------------------
class CountingModel:
    """The real Model, counting detokenize calls."""

    def __init__(self, model):
        self.model, self.detokenized = model, 0

    def detokenize(self, tokens, **kw):
        self.detokenized += 1
        return self.model.detokenize(tokens, **kw)


def test_a_reply_is_detokenized_once_to_read_its_calls(smol):
    plan = ToolPlan(ChatTemplate(smol, HERMES), tool_request(TOOLS, "required"))
    text = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    ids = smol.tokenize(text, add_special=False, parse_special=False)
    counting = CountingModel(smol)
    out = plan.read(counting, Output(text, ids, "stop", None))
    assert counting.detokenized == 1 and [c.name for c in out.tool_calls] == ["get_time"]


def test_a_stream_looks_only_at_its_unsent_tail(smol):
    from parallel_gen.server.service import Choice

    class Counting(ToolPlan):
        looked = 0

        def stream_split(self, text):
            Counting.looked += len(text)
            return super().stream_split(text)

    plan = Counting(ChatTemplate(smol, HERMES), tool_request(TOOLS))
    c = Choice(0)
    pieces = ["word "] * 2000 + ["<tool", "_call>", '{"name": '] + ['"x"'] * 500
    sent = "".join(c.hold_back(plan, p) for p in pieces)
    assert sent == "word " * 2000
    assert Counting.looked < 2 * len("".join(pieces[:2003]))  # linear: each character looked at ~once
    c.output = Output("".join(pieces), [], "stop")  # finished: the collector's whole output
    assert c.sent_text() == sent


# -- 8. cancels are never lost -------------------------------------------------------------------
def test_concurrent_acloses_both_wait_for_the_cancel(smol):
    async def main():
        client = AsyncClient(smol)
        params = pg.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        client.submit([Item(0, 0, smol.tokenize("Tell me a long story about a dragon."), params.to_native(0))],
                      stream=True)
        await client.next()  # it runs
        first = asyncio.ensure_future(client.aclose())
        await asyncio.sleep(0)  # the first aclose has sent its cancel and waits
        await client.aclose()
        assert client.in_flight == 0
        assert smol.stats().active_requests == 0  # the second returned only once the KV was freed
        await first

    asyncio.run(main())


def test_a_cancel_queued_behind_stop_soon_is_answered(smollm2_path):
    from parallel_gen.core.runner import _Cancel

    m = pg.Model(smollm2_path, n_parallel=1, n_ctx=128, n_threads=1)
    runner = m.runner
    gate, inside = threading.Event(), threading.Event()

    def hold(engine):
        inside.set()
        gate.wait(30)

    t = threading.Thread(target=runner.run_on_engine, args=(hold,))
    t.start()
    assert inside.wait(30)  # the engine thread is busy: commands queue up
    runner.stop_soon()  # (from Model.__del__ on some thread) queues the stop...
    done = threading.Event()
    request = Request("late", collections.deque(), lambda event: None)
    runner._commands.put(_Cancel(request, done))  # ...and a cancel sent just before it lands after it
    gate.set()
    t.join(30)
    assert done.wait(30), "the cancel behind the stop was never answered"
    with pytest.raises(RuntimeError, match="closed"):
        runner.cancel(request)  # after the thread ended: refused at once, not queued
    m.close()


# -- 9. a forced choice is one call ----------------------------------------------------------
def test_a_named_tool_is_one_call_even_with_parallel_calls_on(smol):
    convs = [user("What is the weather in Paris, Rome and Oslo?"), user("Weather in Tokyo and Lima?")]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for template in (HERMES, None):  # the family's format and the generic one
        r = pg.chat_parallel(smol, convs, tools=TOOLS, tool_choice=choice, chat_template=template,
                             temperature=0, max_tokens=120)
        for c in r:
            check_calls(c.outputs[0], names=["get_weather"])
            assert len(c.tool_calls) == 1, c.text


def test_generic_required_cut_short_keeps_its_whole_calls(smol):
    conv = user("What is the weather in Paris, Rome, Oslo, Lima, Cairo and Tokyo?")
    whole = pg.chat_parallel(smol, [conv], tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300)[0]
    assert whole.tool_calls, whole.text
    text = whole.text
    first_end = text.index("}}") + 2  # the first call's end
    n = len(smol.tokenize(text[:first_end], add_special=False)) + 2
    cut = pg.chat_parallel(smol, [conv], tools=TOOLS, tool_choice="required", temperature=0, max_tokens=n)[0]
    assert cut.finish_reason == "length" and len(cut.tool_calls) >= 1 and cut.outputs[0].content == ""
    for call in cut.tool_calls:
        assert call.name in SCHEMAS
