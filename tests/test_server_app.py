"""create_app in-process (Starlette's TestClient runs the app's lifespan): loading and
load failure (503), an engine failure (500, then the server keeps serving), settings."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from starlette.testclient import TestClient

import parallel_gen as pg
from parallel_gen.server import ServerSettings, create_app


def _error(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code, body
    return body["error"]


def test_health_is_503_while_loading_then_200(smollm2_path):
    go = threading.Event()
    loaded = []

    def load():
        go.wait(30)
        m = pg.Model(smollm2_path, n_parallel=2, n_ctx=256, n_threads=1)
        loaded.append(m)
        return m

    with TestClient(create_app(load)) as client:
        _error(client.get("/health"), 503, "loading")
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        _error(r, 503, "loading")
        assert r.headers["retry-after"] == "1"
        go.set()
        for _ in range(300):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.1)
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/v1/models").json()["data"][0]["id"] == smollm2_path.stem
        assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    assert loaded[0].closed  # the app loaded it, so the app closed it at shutdown


def test_load_failure_is_503_with_the_reason(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    failures = []
    app = create_app(lambda: pg.Model(bad))
    app.state.lifecycle.on_load_error = failures.append
    with TestClient(app) as client:
        for _ in range(300):
            if failures:
                break
            threading.Event().wait(0.05)
        e = _error(client.get("/health"), 503, "load_failed")
        assert "ModelLoadError" in e["message"]


def test_engine_failure_is_500_and_the_server_keeps_serving(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256, n_threads=1) as model:
        with TestClient(create_app(model)) as client:
            model._inject_abort(2)
            e = _error(client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 20, "ignore_eos": True}),
                       500, "engine_failure")
            assert "Traceback" not in e["message"]
            model._inject_abort(2)
            with client.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 20,
                                                                 "ignore_eos": True, "stream": True}) as r:
                data = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert data[-1] == "data: [DONE]" and '"engine_failure"' in data[-2]
            # The Responses stream ends with an error event, then response.failed (the SDK's shapes).
            model._inject_abort(2)
            with client.stream("POST", "/v1/responses", json={"input": "Hello", "max_output_tokens": 20,
                                                               "stream": True}) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
            assert events[0]["type"] == "response.created" and [e["type"] for e in events[-2:]] == \
                ["error", "response.failed"]
            assert events[-2]["code"] == "engine_failure" and events[-1]["response"]["status"] == "failed"
            assert events[-1]["response"]["error"]["code"] == "engine_failure"
            model._inject_abort(2)
            _error(client.post("/v1/responses", json={"input": "Hello", "max_output_tokens": 20}), 500, "engine_failure")
            r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            assert client.get("/health").status_code == 200
        assert not model.closed  # a Model handed in is the caller's to close


def test_model_without_chat_template_gets_400_naming_the_fix(gemma3_path):
    with pg.Model(gemma3_path, n_parallel=1, n_ctx=128, n_threads=1) as model:
        with TestClient(create_app(model)) as client:
            e = _error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}),
                       400, "no_chat_template")
            assert "--chat-template" in e["message"]
            e = _error(client.post("/v1/responses", json={"input": "Hi"}), 400, "no_chat_template")
            assert e["param"] == "input"  # the Responses field, not the chat request's it became
        with TestClient(create_app(model, chat_template="chatml")) as client:
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_open_request_limit_is_503_in_openai_shape(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=256, n_threads=1) as model:
        with TestClient(create_app(model, max_open_requests=1)) as client:
            with client.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 40, "stream": True,
                                                                 "ignore_eos": True}) as r:
                assert r.status_code == 200
                busy = client.get("/health")
                _error(busy, 503, "too_many_requests")
                assert busy.headers["retry-after"] == "1"
                data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
            assert client.get("/health").status_code == 200  # the slot is free again


@pytest.mark.parametrize("kw, message", [
    ({"max_queue": -1}, "max_queue=-1"), ({"max_n": 0}, "max_n=0"), ({"max_body": True}, "max_body"),
    ({"api_key": "  "}, "api_key"), ({"nonsense": 1}, "nonsense"), ({"max_open_requests": 0}, "max_open_requests"),
    ({"shutdown_grace": -1}, "shutdown_grace"), ({"served_model_names": "smol"}, "served_model_names"),
    ({"served_model_names": ["a", ""]}, "served_model_names"), ({"strict_model_name": 1}, "strict_model_name"),
    ({"allowed_origins": ["http://localhost:3000/"]}, "trailing slash"), ({"allowed_origins": ["localhost"]}, "origin"),
    ({"stream_interval": 0}, "stream_interval=0"), ({"stream_interval": 2**31}, "stream_interval"),
    ({"stream_interval": "4"}, "stream_interval"),
])
def test_bad_settings_raise_before_serving(kw, message):
    with pytest.raises((TypeError, ValueError), match=message):
        ServerSettings(**kw)


# -- issue 20's server bugs -------------------------------------------------------------
def test_a_prompt_failure_maps_to_its_status_by_code_not_by_words(smol):
    """The 400 context_length_exceeded branch used to look for the word "context" in the
    engine's message, which says "n_ctx": a too-long prompt failing in the engine got 500."""
    from parallel_gen.errors import ErrorCode, Failure
    from parallel_gen.server.service import Choice, failed_choice

    too_long = smol.check_tokens([1] * (smol.n_ctx + 1))  # the engine's own code and message
    assert too_long.code is ErrorCode.PROMPT_TOO_LONG and "context" not in too_long.message.replace("n_ctx", "")
    err = failed_choice(Choice(0, failure=too_long))
    assert (err.status, err.code) == (400, "context_length_exceeded")
    err = failed_choice(Choice(0, failure=Failure(ErrorCode.ABORTED, "llama_decode failed (code -3)")))
    assert (err.status, err.code) == (500, "engine_failure")
    err = failed_choice(Choice(0, failure=smol.check_tokens([])))
    assert (err.status, err.code) == (400, "invalid_value")


def test_slow_chat_rendering_does_not_stall_the_event_loop(smollm2_path, monkeypatch):
    """Chat-template rendering (and the JSON-schema grammar, the grammar check) used to run
    on the event loop: one slow request stalled /health and every stream. Here rendering
    is held until /health has answered; on the loop, /health would never answer."""
    from parallel_gen.templates import ChatTemplate

    release, rendering = threading.Event(), threading.Event()
    real_render = ChatTemplate.render

    def held_render(self, *args, **kwargs):
        rendering.set()
        release.wait(60)
        return real_render(self, *args, **kwargs)

    monkeypatch.setattr(ChatTemplate, "render", held_render)
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256, n_threads=1) as model:
        with TestClient(create_app(model)) as client:
            results = {}
            schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}

            def chat():
                results["chat"] = client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})

            t = threading.Thread(target=chat, daemon=True)
            t.start()
            assert rendering.wait(30)
            health = {}
            h = threading.Thread(target=lambda: health.setdefault("r", client.get("/health")), daemon=True)
            h.start()
            h.join(20)
            answered = "r" in health
            release.set()
            t.join(120)
            assert answered and health["r"].status_code == 200, "/health waited for a chat template to render"
            assert results["chat"].status_code == 200, results["chat"].text


def test_streamed_logprobs_are_built_once(smol):
    """A kept stream's whole output reuses the logprobs its deltas built (extended in
    place): each token's are built once, not again when the sequence finishes."""
    from parallel_gen.core.client import Routed
    from parallel_gen.core.collector import Collector
    from parallel_gen.core.events import Delta, SequenceDelta, SequenceFinished, SequenceResult

    class Counting:
        calls = 0

        def token_text(self, t):
            Counting.calls += 1
            return smol.token_text(t)

    n = 3000
    collector = Collector(Counting(), stream=True, keep_outputs=True)  # type: ignore[arg-type]
    collector.expect(0, "x", 1, 1)
    for _ in range(n):
        collector.handle(Routed(None, SequenceDelta(Delta(0, 0, b"ab", [7], [(-0.5, [])]))))  # type: ignore[arg-type]
    done = SequenceResult(0, 0, 1, [7] * n, b"ab" * n, "length", None, None, [(-0.5, [])] * n)
    last = collector.handle(Routed(None, SequenceFinished(done)))  # type: ignore[arg-type]
    out = collector.take_output(0, 0)
    assert last is not None and last.finished and last.logprobs == [] and last.text == ""
    assert out is not None and out.text == "ab" * n and len(out.logprobs) == n
    assert Counting.calls == n  # once per token


def test_streamed_logprob_offsets_are_counted_in_place(smol):
    """Each event's logprobs used to be appended by rebuilding the choice's whole list (and
    the chunk offsets by slicing it): quadratic in the tokens of a long stream."""
    from parallel_gen.results import TokenLogprobs
    from parallel_gen.server.metrics import Metrics
    from parallel_gen.server.service import Call, Service
    from parallel_gen.stream import StreamEvent

    n = 3000
    evs = [StreamEvent(0, "ab", [7], False, logprobs=[TokenLogprobs(7, "ab", -0.5, [])]) for _ in range(n)]
    evs.append(StreamEvent(0, "", [], True, "length"))

    class Replay:
        def __init__(self):
            self.it = iter(evs)

        def __aiter__(self):
            return self

        async def __anext__(self):
            try:
                return next(self.it)
            except StopIteration:
                raise StopAsyncIteration

        def take_output(self, index, sample):
            return None

        async def aclose(self):
            pass

    service = Service(smol, ServerSettings(), Metrics(lambda: None))
    call = Call("t", "completions", ["x"], [pg.SamplingParams()], 1, [1], stream=Replay())

    async def run():
        offsets = []
        async for c, ev in service.events(call):
            if ev.logprobs:
                offsets.append(c.event_offset)
        return offsets, c

    import asyncio

    offsets, c = asyncio.run(run())
    assert offsets == [2 * i for i in range(n)] and c.tokens == n


def test_ignored_fields_are_logged_at_any_depth(smollm2_path, caplog):
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=256, n_threads=1) as model:
        with TestClient(create_app(model)) as client, caplog.at_level(logging.INFO, logger="parallel_gen"):
            r = client.post("/v1/chat/completions", headers={"X-Request-Id": "nested-1"}, json={
                "messages": [{"role": "user", "content": "Hi", "name": "ann"},
                             {"role": "assistant", "content": "Hello", "refusal": None},
                             {"role": "user", "content": [{"type": "text", "text": "Bye", "cache_control": {}}]}],
                "max_tokens": 2, "user": "u1", "stream_options": {"include_usage": True, "include_obfuscation": False},
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"},
                                                                           "description": "d"}}})
            assert r.status_code == 200, r.text
            r = client.post("/v1/responses", headers={"X-Request-Id": "nested-2"}, json={
                "input": [{"type": "message", "role": "user", "content": "Hi", "id": "m1"}], "max_output_tokens": 2,
                "reasoning": {"effort": "low"}, "text": {"format": {"type": "text"}, "verbosity": "low"}})
            assert r.status_code == 200, r.text
    lines = [rec.getMessage() for rec in caplog.records if "ignoring unsupported fields" in rec.getMessage()]
    # (A message's name is not ignored: it reaches the template, as a tool result's name does.)
    assert lines == [
        "request nested-1: ignoring unsupported fields messages[].content[].cache_control, "
        "messages[].refusal, response_format.json_schema.description, stream_options.include_obfuscation, user",
        "request nested-2: ignoring unsupported fields input[].id, reasoning, text.verbosity"]
