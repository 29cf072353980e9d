"""Tool calls through the server: a real `parallel-gen serve` process with the Hermes-style
template of tests/templates/hermes_tools.jinja (--chat-template-file), driven by the openai
client, raw HTTP and pydantic-ai, and compared with chat_parallel on the same template.

SmolLM2 is not tool-trained: "required" and a named tool are deterministic through the
grammar; "auto" follows a few-shot history (FEW_SHOT), greedy.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import parallel_gen as pg
from test_server import ALIAS, Server, local  # noqa: F401 (local: the in-process reference fixture)
from test_tools import FEW_SHOT, HERMES, SCHEMAS, TOOLS, WEATHER, call, tool, user

TEMPLATE_FILE = str(Path(__file__).parent / "templates" / "hermes_tools.jinja")


@pytest.fixture(scope="module")
def server(smollm2_path):
    # --no-prompt-cache: replies are compared with the in-process reference (no cache), and a
    # prefill resumed from a cached prefix changes numerics slightly
    s = Server(smollm2_path, "--n-parallel", "4", "--chat-template-file", TEMPLATE_FILE, "--no-prompt-cache")
    yield s
    s.stop()


def ask(server, messages, **kw):
    return server.client().chat.completions.create(model=ALIAS, messages=messages, temperature=0, **kw)


def check_message(message, names=None):
    """Calls of offered tools, unique ids, arguments (JSON text) valid for their schema."""
    assert message.tool_calls, message
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)
    for c in message.tool_calls:
        assert c.type == "function" and c.function.name in (names or SCHEMAS)
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def calls_of(message):
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def local_calls(local, conv, **kw):
    out = pg.chat_parallel(local, [conv], tools=TOOLS, chat_template=HERMES, temperature=0, **kw)[0]
    return out, [(c.name, c.parsed_arguments) for c in out.tool_calls or ()]


def test_required_is_a_valid_call_as_in_process(server, local):
    conv = user("What is the weather in Paris?")
    r = ask(server, conv, tools=TOOLS, tool_choice="required", max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_message(choice.message)
    want, want_calls = local_calls(local, conv, tool_choice="required", max_tokens=80)
    assert calls_of(choice.message) == want_calls and want.finish_reason == "tool_calls"
    assert calls_of(choice.message)[0] == ("get_weather", {"city": "Paris"})
    assert r.usage.prompt_tokens == len(local.tokenize(want.prompt))  # the tools are in the prompt


def test_named_tool_and_no_parallel_calls(server):
    r = ask(server, user("What is the weather in Paris and the time in Tokyo?"), tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False,
            max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_message(choice.message, names=["get_time"])
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]


def test_stream_sends_openai_tool_call_deltas(server):
    conv = user("What is the weather in Paris and what time is it in Tokyo?")
    whole = ask(server, conv, tools=TOOLS, tool_choice="required", max_tokens=160).choices[0]
    stream = ask(server, conv, tools=TOOLS, tool_choice="required", max_tokens=160, stream=True)
    content, calls, finish = [], {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for d in delta.tool_calls or ():
            got = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            got["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and "".join(content) == ""  # nothing of the calls leaks as content
    assert len(calls) >= 2 and list(calls) == list(range(len(calls)))
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == calls_of(whole.message)
    assert all(c["id"] for c in calls.values()) and len({c["id"] for c in calls.values()}) == len(calls)


def test_auto_calls_after_a_few_shot_history_and_answers_otherwise(server, local):
    conv = FEW_SHOT + user("What is the weather in Rome?")
    r = ask(server, conv, tools=TOOLS, max_tokens=60).choices[0]
    want, want_calls = local_calls(local, conv, max_tokens=60)
    assert r.finish_reason == "tool_calls" and calls_of(r.message) == want_calls == [("get_weather",
                                                                                      {"city": "Rome"})]
    check_message(r.message)
    # Streamed: the same calls; under "auto" a reply's text before a call streams as content.
    deltas = list(ask(server, conv, tools=TOOLS, max_tokens=60, stream=True))
    streamed = [(d.function.name, json.loads(d.function.arguments))
                for ch in deltas for d in ch.choices[0].delta.tool_calls or ()]
    assert streamed == want_calls and deltas[-1].choices[0].finish_reason == "tool_calls"
    # A reply that starts no call is text, streamed as it comes, the same as in-process.
    joke = FEW_SHOT + user("Thanks! Tell me a joke.")
    text = ask(server, joke, tools=TOOLS, max_tokens=40).choices[0]
    want, _ = local_calls(local, joke, max_tokens=40)
    assert text.finish_reason in ("stop", "length") and not text.message.tool_calls
    assert text.message.content == want.outputs[0].content and text.message.content
    pieces = [ch.choices[0].delta.content or "" for ch in ask(server, joke, tools=TOOLS, max_tokens=40, stream=True)]
    assert "".join(pieces).strip() == text.message.content and sum(1 for p in pieces if p) > 1


def test_a_tool_calling_history_reaches_the_prompt(server, local):
    """The history as OpenAI clients send it (assistant content null + tool_calls, then a
    tool message): rendered through the template, the call and the result both in it."""
    conv = FEW_SHOT[:4] + user("And in Paris?")
    r = ask(server, conv, tools=TOOLS, tool_choice="required", max_tokens=60)
    prompt = pg.apply_chat_template(local, conv, tools=TOOLS, chat_template=HERMES)
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n</tool_call><|im_end|>\n'
            '<|im_start|>tool\n{"temperature": 14, "sky": "rain"}<|im_end|>') in prompt
    assert r.usage.prompt_tokens == len(local.tokenize(prompt))
    dropped = pg.apply_chat_template(local, [m for m in conv if not m.get("tool_calls") and m["role"] != "tool"],
                                     tools=TOOLS, chat_template=HERMES)
    assert r.usage.prompt_tokens > len(local.tokenize(dropped))
    assert calls_of(r.choices[0].message) == local_calls(local, conv, tool_choice="required", max_tokens=60)[1]
    # A reply's message goes straight back into the next request (model_dump(), as clients do).
    again = conv + [r.choices[0].message.model_dump(exclude_none=True)]
    again += [{"role": "tool", "tool_call_id": r.choices[0].message.tool_calls[0].id, "content": "sunny"}]
    assert ask(server, again, tools=TOOLS, max_tokens=20).choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_none_and_no_tools_are_plain_chat(server):
    conv = user("What is the weather in Paris?")
    plain = ask(server, conv, max_tokens=20).choices[0]
    assert plain.message.tool_calls is None and plain.finish_reason in ("stop", "length")
    raw = server.http.post("/v1/chat/completions", json={"messages": conv, "max_tokens": 20, "temperature": 0,
                                                         "tools": TOOLS, "tool_choice": "none"}).json()
    assert "tool_calls" not in raw["choices"][0]["message"]
    assert raw["choices"][0]["message"]["content"] == plain.message.content


def _error(r, param):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    return err["message"]


def test_errors_name_the_field(server):
    def post(**kw):
        body = {"messages": user("Hi"), "max_tokens": 5}
        body.update(kw)
        return server.http.post("/v1/chat/completions", json=body)

    named = {"type": "function", "function": {"name": "get_news"}}
    assert "'get_news' is not one of the tools (get_weather, get_time)" in _error(
        post(tools=TOOLS, tool_choice=named), "tool_choice")
    assert "needs tools" in _error(post(tool_choice="required"), "tool_choice")
    assert "tool_choice must be 'none', 'auto', 'required'" in _error(post(tools=TOOLS, tool_choice="always"),
                                                                     "tool_choice")
    url_ref = tool("f", "", {"x": {"$ref": "https://example.com/schema.json"}}, ["x"])
    assert "tools[0]['function']['parameters']: cannot convert the schema" in _error(post(tools=[url_ref]), "tools")
    assert "is also the name of tools[0]" in _error(post(tools=[WEATHER, WEATHER]), "tools")
    assert "tools cannot be combined with grammar" in _error(
        post(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tools")
    bad_args = user("Hi") + [{"role": "assistant", "content": None,
                              "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": "{\"city\": "}}]},
                             {"role": "tool", "tool_call_id": "c1", "content": "x"}]
    assert "messages[1]['tool_calls'][0]['function']['arguments'] is not valid JSON" in _error(
        post(messages=bad_args, tools=TOOLS), "messages")
    not_object = [dict(bad_args[1], tool_calls=[call("c1", "get_weather", [1])])]
    assert "must be a JSON object" in _error(post(messages=user("Hi") + not_object), "messages")
    # The server is unharmed.
    assert server.client().chat.completions.create(model=ALIAS, messages=user("Hi"), max_tokens=2).choices


def test_pydantic_ai_tool_round_trip(server):
    """An agent with a tool, configured as for OpenAI: it sends the history (with its
    tool-calling turns) and gets a call, runs the tool, sends the result, gets the answer."""
    from pydantic_ai import Agent
    from pydantic_ai.messages import (ModelRequest, ModelResponse, TextPart, ToolCallPart, ToolReturnPart,
                                      UserPromptPart)
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    model = OpenAIChatModel("gpt-4o", provider=OpenAIProvider(base_url=server.url + "/v1", api_key=server.key))
    agent = Agent(model, model_settings=ModelSettings(temperature=0, max_tokens=60))
    seen = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return '{"temperature": 21, "sky": "sunny"}'

    history = []  # FEW_SHOT, in pydantic-ai's own message types
    for turn in range(2):
        u, a, t, answer = FEW_SHOT[4 * turn:4 * turn + 4]
        c = a["tool_calls"][0]
        history += [ModelRequest(parts=[UserPromptPart(u["content"])]),
                    ModelResponse(parts=[ToolCallPart(c["function"]["name"], c["function"]["arguments"], c["id"])]),
                    ModelRequest(parts=[ToolReturnPart(c["function"]["name"], t["content"], c["id"])]),
                    ModelResponse(parts=[TextPart(answer["content"])])]
    result = agent.run_sync("What is the weather in Rome?", message_history=history)
    assert seen == ["Rome"]
    calls = [p for m in result.new_messages() for p in m.parts if isinstance(p, ToolCallPart)]
    assert [(p.tool_name, p.args_as_dict()) for p in calls] == [("get_weather", {"city": "Rome"})]
    assert isinstance(result.output, str) and result.output


@pytest.fixture(scope="module")
def own_template(smollm2_path):
    """SmolLM2's own template, which renders no tools: the generic JSON format."""
    s = Server(smollm2_path, "--n-parallel", "2", "--no-prompt-cache")  # compared with in-process
    yield s
    s.stop()


def test_generic_format_for_a_template_without_tools(own_template, local):
    conv = user("What is the weather in Paris?")
    r = ask(own_template, conv, tools=TOOLS, tool_choice="required", max_tokens=80)
    want = pg.chat_parallel(local, [conv], tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80)[0]
    assert r.choices[0].finish_reason == "tool_calls"
    check_message(r.choices[0].message)
    assert calls_of(r.choices[0].message) == [(c.name, c.parsed_arguments) for c in want.tool_calls]
    assert r.usage.prompt_tokens == len(local.tokenize(want.prompt))  # the tools block is in the prompt
    # "auto": the whole reply is JSON, calls or {"response": ...}; an answer comes back as
    # its text alone, streamed or not.
    hello = user("Hello! How are you?")
    whole = ask(own_template, hello, tools=TOOLS, max_tokens=60).choices[0]
    want = pg.chat_parallel(local, [hello], tools=TOOLS, temperature=0, max_tokens=60)[0]
    assert (whole.finish_reason, whole.message.content) == (want.finish_reason, want.outputs[0].content)
    if not want.tool_calls:
        assert whole.message.content and not whole.message.content.lstrip().startswith("{")
    pieces = [ch.choices[0].delta.content or "" for ch in ask(own_template, hello, tools=TOOLS, max_tokens=60,
                                                              stream=True)]
    assert "".join(pieces) == (whole.message.content or "")
