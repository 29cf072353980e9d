"""Review findings (issue 31) through a real `parallel-gen serve` process: an event loop
that never blocks on a request's preparation, admission before any costly work, client
errors as 400s, /v1/responses refusing tools, one call for a named tool, and small
protocol gaps (system_fingerprint, llama-server's inline json_object schema, --host lists)."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from test_robustness import big_schema
from test_server import ALIAS, KEY, Server, _wait
from test_tools import TOOLS, user

HERMES_FILE = str(Path(__file__).parent / "templates" / "hermes_tools.jinja")
DEEP = 50_000
LATE = 0.1  # seconds beyond an answer's normal latency that count it as late


def _error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert code is None or err["code"] == code, err
    assert param is None or err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Server(smollm2_path, "--n-parallel", "4", "--max-queue", "256", "--chat-template-file", HERMES_FILE)
    yield s
    s.stop()


def _health(http):
    return http.get("/health")


def _one_token(http):
    return http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "temperature": 0})


# -- 1 and 4: the event loop keeps answering while a big request is prepared ---------------------
def test_health_answers_on_time_while_a_256_prompt_schema_request_is_prepared(server):
    """Late answers counted (not a timed assertion): four clients poll /health and one sends
    one-token requests, before and while a 256-prompt request with a seed and a large
    schema is prepared and run; an answer is late when it takes 100 ms more than the
    median of its kind before the big request. Before, the 256 schema conversions ran on
    the event loop (0.6 s here) and every poller was late. One-token requests are counted
    while the big request is prepared (until its first token streams back): after that
    they share the engine's steps with it."""
    body = {"prompt": [f"Record {i}:" for i in range(256)], "max_tokens": 1, "seed": 7, "stream": True,
            # a distinct schema per run: nothing converted before (conversions are remembered)
            "json_schema": big_schema(tag=f"t{time.time_ns()}")}
    done = threading.Event()
    answers = {"health": [], "token": []}  # (sent, answered)

    def poll(kind, send, pause):
        client = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
        while not done.is_set():
            t = time.perf_counter()
            assert send(client).status_code == 200
            answers[kind].append((t, time.perf_counter()))
            time.sleep(pause)

    pool = concurrent.futures.ThreadPoolExecutor(5)
    pollers = [pool.submit(poll, "health", _health, 0.01) for _ in range(4)]
    pollers.append(pool.submit(poll, "token", _one_token, 0.0))
    gc.collect()
    gc.disable()  # this process's own collector would pause the pollers (a late answer that is not the server's)
    try:
        time.sleep(1.5)
        sent = time.perf_counter()
        first_token, chunks = None, 0
        with server.http.stream("POST", "/v1/completions", json=body) as big:
            assert big.status_code == 200
            for line in big.iter_lines():
                if line.startswith("data: {"):
                    first_token = first_token or time.perf_counter()
                    chunks += 1
        done.set()
        for f in pollers:
            f.result(60)
    finally:
        gc.enable()
    assert chunks >= 256 and first_token is not None
    before = {kind: [end - t for t, end in answers[kind] if end < sent] for kind in answers}
    during = {"health": [end - t for t, end in answers["health"] if end > sent],
              "token": [end - t for t, end in answers["token"] if end > sent and end < first_token]}
    assert all(len(before[k]) >= 5 for k in before) and len(during["health"]) >= 20 and during["token"], \
        ({k: len(v) for k, v in before.items()}, {k: len(v) for k, v in during.items()})
    late = {kind: sum(x > statistics.median(before[kind]) + LATE for x in during[kind]) for kind in during}
    assert late["health"] <= 1 and late["token"] == 0, (late, {k: statistics.median(v) for k, v in before.items()})


# -- 3: client-sent JSON nested too deep is a 400 -------------------------------------------------
def test_a_history_with_deeply_nested_arguments_is_a_400(server):
    deep = '{"a": ' + "[" * DEEP + "]" * DEEP + "}"
    messages = user("Hi") + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}]}]
    r = server.http.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS, "max_tokens": 2})
    err = _error(r, 400, "invalid_value", "messages")
    assert "not valid JSON" in err["message"]
    assert server.http.get("/health").status_code == 200


# -- 5: /v1/responses refuses tools instead of dropping them --------------------------------------
def test_responses_refuses_tools_naming_the_field(server):
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    r = server.http.post("/v1/responses", json={"input": "Weather in Paris?", "tools": tools,
                                                "tool_choice": "required"})
    err = _error(r, 400)
    assert err["param"] in ("tools", "tool_choice") and "chat/completions" in err["message"]
    r = server.http.post("/v1/responses", json={"input": "Weather?", "tool_choice": "required"})
    _error(r, 400, param="tool_choice")
    ok = server.http.post("/v1/responses", json={"input": "Hi", "tools": [], "tool_choice": "auto",
                                                 "max_output_tokens": 2})
    assert ok.status_code == 200, ok.text


# -- 9: a named tool is one call, finish_reason tool_calls ----------------------------------------
def test_named_tool_is_one_call_and_finishes_with_tool_calls(server):
    r = server.client().chat.completions.create(
        model=ALIAS, messages=user("What is the weather in Paris, Rome and Oslo?"), tools=TOOLS, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=150)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name == "get_weather"


# -- 10: protocol gaps ------------------------------------------------------------------------------
def test_answers_carry_a_system_fingerprint(server):
    client = server.client()
    a = client.completions.create(model=ALIAS, prompt="Hi", max_tokens=2)
    b = client.chat.completions.create(model=ALIAS, messages=user("Hi"), max_tokens=2)
    chunks = list(client.chat.completions.create(model=ALIAS, messages=user("Hi"), max_tokens=2, stream=True))
    assert a.system_fingerprint and a.system_fingerprint.startswith("fp_")
    assert {a.system_fingerprint, b.system_fingerprint} | {c.system_fingerprint for c in chunks} == \
        {a.system_fingerprint}


def test_json_object_with_an_inline_schema_is_applied(server):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "score": {"type": "integer"}}, "required": ["answer", "score"]}
    r = server.http.post("/v1/chat/completions", json={
        "messages": user("Is the sky blue? Reply in JSON."), "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_object", "schema": schema}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
    assert not any("ignoring unsupported fields" in line and "schema" in line for line in server.lines)


def test_host_takes_a_comma_separated_list(smollm2_path):
    s = Server(smollm2_path, "--host", "127.0.0.1,::1", "--n-parallel", "1", key=None)
    try:
        listening = [line for line in s.lines if "listening on" in line]
        assert any("http://[::1]:" in line for line in listening), listening
        assert httpx.get(f"http://127.0.0.1:{s.port}/health").status_code == 200
        assert httpx.get(f"http://[::1]:{s.port}/health").status_code == 200
    finally:
        s.stop()


# -- 4: a refused request costs no preparation -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny(smollm2_path):
    s = Server(smollm2_path, "--n-parallel", "1", "--max-queue", "1", "--chat-template-file", HERMES_FILE, key=None)
    yield s
    s.stop()


def test_a_full_server_refuses_before_converting_or_parsing(tiny):
    http = httpx.Client(base_url=tiny.url, timeout=120)
    bad_schema = {"prompt": "Hi", "max_tokens": 2, "json_schema": {"type": "object", "properties": {
        "a": {"$ref": "#/definitions/missing"}}}}
    deep = '{"a": ' + "[" * DEEP + "]" * DEEP + "}"
    bad_history = {"messages": user("Hi") + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": deep}}]}],
        "tools": TOOLS, "max_tokens": 2}
    # Idle: these are client errors, found by the conversion and the parsing.
    _error(http.post("/v1/completions", json=bad_schema), 400, param="json_schema")
    _error(http.post("/v1/chat/completions", json=bad_history), 400, param="messages")
    with http.stream("POST", "/v1/completions", json={"prompt": "Once upon a time", "n": 2, "max_tokens": 400,
                                                      "ignore_eos": True, "stream": True}) as busy:
        lines = busy.iter_lines()  # (kept: a dropped iterator closes the stream)
        next(lines)  # admitted and running: the server holds 2 of its 2 sequences
        # Full: refused at once, before any of that work (which would have found the 400s).
        _error(http.post("/v1/completions", json=bad_schema), 429, "queue_full")
        _error(http.post("/v1/chat/completions", json=bad_history), 429, "queue_full")
    deadline = time.monotonic() + 60
    while http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 429:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    _error(http.post("/v1/completions", json=bad_schema), 400, param="json_schema")


# -- 6 on the server: its result cache keeps whole prefills' outputs only ------------------------
def test_the_servers_result_cache_leaves_out_prefills_that_reused_kv(smollm2_path, tmp_path):
    """The rule of generate_parallel's cache (tests/test_robustness.py) holds for the server's:
    an answer whose prefill resumed from the prompt cache is not stored. Counted in the
    server's hits; its single writer thread stores in order, so once a later answer is a
    hit, every earlier answer's store has been decided."""
    s = Server(smollm2_path, "--result-cache", tmp_path / "rc", key=None)
    try:
        http = httpx.Client(base_url=s.url, timeout=120)
        base = "The history of the city of Lyon, told in three short parts. Part one:"

        def ask(prompt):
            r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()

        def hits():
            return s.metric("parallel_gen_result_cache_calls_total", '{outcome="hit"}') or 0

        assert ask(base)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # decoded whole: stored
        warm = ask(base + " the Romans")
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # resumed from the cached prefix
        other = "Zebras live in"  # decoded whole, stored after the warm answer's turn
        ask(other)
        assert _wait(lambda: ask(other) and hits() >= 1, 60)
        before = hits()
        again = ask(base + " the Romans")
        assert hits() == before  # not stored: answered by decoding again
        assert again["choices"][0]["text"] == warm["choices"][0]["text"]
        assert ask(base) and hits() == before + 1  # the whole prefill's answer was stored
    finally:
        s.stop()
