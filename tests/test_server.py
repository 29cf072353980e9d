"""The OpenAI-compatible server: a real uvicorn process on a loopback port, driven by the
official `openai` client and by raw HTTP (httpx), compared with in-process generation."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

import parallel_gen as pg

PYTHON_DIR = str(Path(pg.__file__).resolve().parent.parent)
KEY = "test-key-8c1f"
ALIAS = "smol"
N_CTX = 512
PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "Water boils at"]


class Server:
    """`parallel-gen serve` in a subprocess; its port read from its stderr."""

    def __init__(self, model_path, *args, key=KEY, names=(ALIAS,)):
        self.key = key
        self.lines = []
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        cmd = [sys.executable, "-m", "parallel_gen", "serve", "-m", str(model_path), "--port", "0",
               "--n-ctx", str(N_CTX), "--threads", "2", *map(str, args)]
        if names:
            cmd += ["--served-model-name", *names]
        if key is not None:
            cmd += ["--api-key", key]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.port = None
        found = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(60):
            self.stop()
            raise AssertionError("server did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=120,
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
        deadline = time.monotonic() + 60
        while self.http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.1)

    def client(self, prefix="/v1", **kw):
        return openai.OpenAI(base_url=self.url + prefix, api_key=self.key or "none", max_retries=0, timeout=120, **kw)

    def metric(self, name, labels=""):
        text = self.http.get("/metrics").text
        m = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(smollm2_path):
    # Without the prompt cache, as `local`: a prompt decoded from a cached prefix can
    # round differently, and the two processes' caches hold different things (the cache
    # has tests of its own below).
    s = Server(smollm2_path, "--n-parallel", "8", "--max-queue", "64", "--no-prompt-cache")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(smollm2_path):
    """In-process reference: same model file and per-sequence context as the server."""
    with pg.Model(smollm2_path, n_parallel=8, n_ctx=N_CTX, n_threads=2, prompt_cache=False) as m:
        yield m


def still_serves(server):
    r = server.client().completions.create(model=ALIAS, prompt="2 + 2 =", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


# -- the happy paths, through the official client ---------------------------------------------
def test_completions_array_prompt_and_n_match_in_process(server, local):
    r = server.client().completions.create(model=ALIAS, prompt=PROMPTS[:3], n=2, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == ALIAS
    assert [c.index for c in r.choices] == list(range(6))
    want = pg.generate_parallel(local, PROMPTS[:3], max_tokens=12, temperature=0)
    for i, c in enumerate(want):
        assert r.choices[2 * i].text == c.text and r.choices[2 * i + 1].text == c.text  # prompt i, samples 0, 1
        assert r.choices[2 * i].finish_reason == c.finish_reason
    assert r.usage.prompt_tokens == sum(c.prompt_tokens for c in want)
    assert r.usage.completion_tokens == 2 * sum(len(c.token_ids) for c in want)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_matches_chat_parallel(server, local):
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What colour is the sky?"}]
    r = server.client().chat.completions.create(model=ALIAS, messages=messages, max_completion_tokens=16,
                                                temperature=0)
    want = pg.chat_parallel(local, [messages], max_tokens=16, temperature=0)[0]
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert "<|im_end|>" not in r.choices[0].message.content
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens


def test_streaming_with_usage_matches_whole_response(server):
    client = server.client()
    whole = client.completions.create(model=ALIAS, prompt=PROMPTS[:2], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=ALIAS, prompt=PROMPTS[:2], max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    finish = {}
    for ch in chunks[:-1]:
        assert len(ch.choices) == 1
        c = ch.choices[0]
        assert c.index not in finish, "text after the choice's finish chunk"
        texts[c.index] += c.text
        if c.finish_reason is not None:
            finish[c.index] = c.finish_reason
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_streaming_sends_role_then_content_then_finish(server):
    stream = server.client().chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=12, temperature=0,
        n=2, stream=True, stream_options={"include_usage": True})
    per_choice = {0: [], 1: []}
    usage = None
    for ch in stream:
        if not ch.choices:
            usage = ch.usage
            continue
        per_choice[ch.choices[0].index].append(ch.choices[0])
    for events in per_choice.values():
        # Opens with the role alone (content ""), as OpenAI and llama-server do; then content only.
        assert events[0].delta.role == "assistant" and events[0].delta.content == "" and events[0].finish_reason is None
        assert all(e.delta.role is None for e in events[1:]) and events[1].delta.content
        assert events[-1].finish_reason in ("stop", "length")
        assert all(e.finish_reason is None for e in events[:-1])
    texts = ["".join(e.delta.content or "" for e in per_choice[i]) for i in (0, 1)]
    assert texts[0] == texts[1] and texts[0]  # greedy: both samples agree
    assert usage is not None and usage.completion_tokens > 0


def test_raw_sse_framing_ends_with_done(server):
    with server.http.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "stream": True,
                                                             "temperature": 0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "text_completion" for d in data[:-1])


def test_response_format_json_schema_is_enforced(server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = server.client().chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Describe a person as JSON."}], n=3, seed=5,
        temperature=0.8, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), schema)
    # A question whose greedy answer is a short object (an open one like "Give me JSON."
    # runs on to max_tokens, and a cut object proves nothing): it must stop, and parse.
    question = 'Reply with the JSON object {"ok": true} and nothing else.'
    obj = server.client().chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": question}], max_tokens=60, temperature=0,
        response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
    assert json.loads(obj.choices[0].message.content) == {"ok": True}


def test_completion_logprobs_match_in_process(server, local):
    r = server.client().completions.create(model=ALIAS, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    want = pg.generate_parallel(local, PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)[0].outputs[0]
    assert len(lp.tokens) == len(want.token_ids) == r.usage.completion_tokens
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # Greedy: the chosen token is the most likely one.
    for tok, lp_tok, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert lp_tok == pytest.approx(max(top.values()), abs=1e-6)


def test_chat_logprobs(server):
    r = server.client().chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert bytes(t.bytes).decode("utf-8") == t.token


def test_streamed_logprobs_arrive_with_their_tokens(server):
    kw = dict(model=ALIAS, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = server.client().completions.create(prompt=PROMPTS[0], logprobs=2, **kw).choices[0].logprobs
    chunks = list(server.client().completions.create(prompt=PROMPTS[0], logprobs=2, stream=True, **kw))
    with_lp = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(with_lp) >= 2  # not all on the last chunk
    assert [t for lp in with_lp for t in lp.tokens] == whole.tokens
    assert [x for lp in with_lp for x in lp.token_logprobs] == pytest.approx(whole.token_logprobs, abs=1e-6)
    assert [x for lp in with_lp for x in lp.text_offset] == whole.text_offset
    msgs = [{"role": "user", "content": "Count to five."}]
    chat_whole = server.client().chat.completions.create(messages=msgs, logprobs=True, **kw).choices[0].logprobs
    chat_chunks = list(server.client().chat.completions.create(messages=msgs, logprobs=True, stream=True, **kw))
    content = [t for c in chat_chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in content] == [t.token for t in chat_whole.content]
    assert [t.logprob for t in content] == pytest.approx([t.logprob for t in chat_whole.content], abs=1e-6)


def test_a_stream_interval_sends_chunks_of_n_tokens_with_the_same_text(smollm2_path, server):
    """--stream-interval 4: after the first token's chunk, a chunk per 4 tokens, the rest
    with the finish; the same text and logprobs as every-token chunks. A whole response
    on it is the same too, and its time to first token is still observed."""
    s = Server(smollm2_path, "--n-parallel", "2", "--no-prompt-cache", "--stream-interval", "4")
    try:
        kw = dict(model=ALIAS, prompt=PROMPTS[1], max_tokens=14, temperature=0, logprobs=1,
                  extra_body={"ignore_eos": True})
        every = list(server.client().completions.create(stream=True, **kw))
        chunks = list(s.client().completions.create(stream=True, **kw))
        sizes = [len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs]
        assert sizes == [1, 4, 4, 4, 1], sizes
        assert len(every) > len(chunks) + 5

        def text(cs):
            return "".join(c.choices[0].text for c in cs if c.choices)

        def logprobs(cs):
            return [x for c in cs if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]

        assert text(chunks) == text(every) and logprobs(chunks) == pytest.approx(logprobs(every), abs=1e-6)
        count = "parallel_gen_time_to_first_token_seconds_count"
        before = s.metric(count, '{endpoint="completions"}')
        whole = s.client().completions.create(**kw)
        assert whole.choices[0].text == text(every) and whole.usage.completion_tokens == 14
        assert s.metric(count, '{endpoint="completions"}') == before + 1
    finally:
        s.stop()


def test_serve_refuses_a_bad_stream_interval(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "parallel_gen", "serve", "-m", str(smollm2_path), "--port", "0",
                        "--stream-interval", "0"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=PYTHON_DIR))
    assert r.returncode == 2 and "stream_interval=0" in r.stderr, r.stderr[-2000:]


def test_stop_strings(server):
    r = server.client().completions.create(model=ALIAS, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0,
                                           stop=[" 7"])
    c = r.choices[0]
    assert c.finish_reason == "stop" and " 7" not in c.text and "6" in c.text


def test_seed_reproducibility(server):
    client = server.client()

    def sample(seed):
        return client.completions.create(model=ALIAS, prompt="My favourite food is", max_tokens=16,
                                         temperature=1.0, top_p=1.0, seed=seed, n=2,
                                         extra_body={"top_k": 0, "min_p": 0.0}).choices

    a, b = sample(11), sample(11)
    assert [c.text for c in a] == [c.text for c in b]
    others = [c.text for seed in (12, 13, 14) for c in sample(seed)]
    assert any(t != a[0].text for t in others)


def test_models_health_metrics_and_request_id(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [ALIAS]
    assert server.http.get("/health").json() == {"status": "ok"}
    r = server.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "cmpl-abc-123"
    r2 = server.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r2.headers["x-request-id"] and r2.json()["id"] == "cmpl-" + r2.headers["x-request-id"]
    text = server.http.get("/metrics").text
    for name in ("parallel_gen_requests_running", "parallel_gen_requests_waiting", "parallel_gen_prompt_tokens_total",
                 "parallel_gen_generation_tokens_total", "parallel_gen_request_duration_seconds_bucket",
                 "parallel_gen_time_to_first_token_seconds_bucket", "parallel_gen_sequences_finished_total",
                 "parallel_gen_kv_tokens", "parallel_gen_sequences_waiting"):
        assert name in text, name
    assert server.metric("parallel_gen_kv_tokens") == 0  # nothing running now


# -- the prompt cache: multi-turn chat reuses earlier turns' KV ----------------------------------
SYSTEM = "You are a helpful assistant for a hardware store. " * 6


@pytest.fixture(scope="module")
def cached(smollm2_path):
    s = Server(smollm2_path, "--n-parallel", "2")
    yield s
    s.stop()


def _cached_tokens(usage):
    return usage.prompt_tokens_details.cached_tokens


def test_multi_turn_chat_reports_cached_tokens_and_metrics(cached):
    client = cached.client()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Do you sell hammers?"}]
    first = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=8, temperature=0)
    assert _cached_tokens(first.usage) == 0  # a fresh server holds nothing
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And nails?"}]
    second = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=8, temperature=0)
    cached_2 = _cached_tokens(second.usage)
    # the whole first turn (system, question, the reply as the model wrote it) at least
    assert first.usage.prompt_tokens <= cached_2 < second.usage.prompt_tokens
    # streamed, with the usage chunk: the same field
    chunks = list(client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert _cached_tokens(usage) == usage.prompt_tokens - 1  # all of it but the last token
    # the legacy endpoint, and the per-request opt-out (llama-server's field)
    prompt = SYSTEM + "Question: what is a wrench?"  # no chat template: shares nothing yet
    a0 = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=2, temperature=0)
    a = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=2, temperature=0)
    assert _cached_tokens(a0.usage) == 0 and _cached_tokens(a.usage) == a.usage.prompt_tokens - 1
    off = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=2, temperature=0,
                                    extra_body={"cache_prompt": False})
    assert _cached_tokens(off.usage) == 0
    total = sum(_cached_tokens(u) for u in (first.usage, second.usage, usage, a0.usage, a.usage, off.usage))
    assert cached.metric("parallel_gen_cached_prompt_tokens_total") == total
    assert cached.metric("parallel_gen_prompt_cache_hits") == 3
    assert cached.metric("parallel_gen_prompt_cache_misses") == 2  # the opt-out looked nothing up
    assert cached.metric("parallel_gen_prompt_cache_hit_rate") == 0.6
    assert cached.metric("parallel_gen_prompt_cache_tokens") == total
    assert cached.metric("parallel_gen_kv_tokens_cached") > 0
    assert cached.metric("parallel_gen_kv_tokens") == 0
    assert cached.metric("parallel_gen_prompt_cache_evictions") is not None
    # hits split by tier: what streams gave up went to host memory, well within its budget
    assert cached.metric("parallel_gen_host_cache_hits") <= cached.metric("parallel_gen_prompt_cache_hits")
    assert cached.metric("parallel_gen_host_cache_saves") >= cached.metric("parallel_gen_host_cache_entries") >= 1
    assert 0 < cached.metric("parallel_gen_host_cache_bytes") <= 8192 * 2**20
    assert cached.metric("parallel_gen_host_cache_evictions") == 0
    assert cached.metric("parallel_gen_host_cache_restore_failures") == 0
    assert cached.metric("parallel_gen_backend_sampled_tokens") == 0  # off on a CPU (auto)
    r = cached.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "cache_prompt": "no"})
    _error(r, 400, param="cache_prompt")
    # the Responses API names it usage.input_tokens_details.cached_tokens: the chat prompt
    # streamed above, asked again there, is cached whole but its last token
    resp = client.responses.create(model=ALIAS, input=messages, max_output_tokens=2, temperature=0)
    assert resp.usage.input_tokens_details.cached_tokens == resp.usage.input_tokens - 1


def test_without_the_cache_nothing_is_cached(server):
    prompt = SYSTEM + "Question: what is a drill?"
    for _ in range(2):
        r = server.client().completions.create(model=ALIAS, prompt=prompt, max_tokens=2, temperature=0)
        assert _cached_tokens(r.usage) == 0
    assert server.metric("parallel_gen_prompt_cache_hits") == 0
    assert server.metric("parallel_gen_kv_tokens_cached") == 0


# -- every error status has OpenAI's body, and the server keeps serving -------------------------
def _error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in r.text and "detail" not in body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def test_error_statuses(server):
    http = server.http
    post = lambda body, **kw: http.post("/v1/completions", json=body, **kw)  # noqa: E731
    e = _error(http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
               400, "invalid_json")
    still_serves(server)
    e = _error(post({"prompt": "x", "max_tokens": "many"}), 400, param="max_tokens")
    assert "'many'" in e["message"]
    e = _error(post({"prompt": 42}), 400, param="prompt")
    e = _error(post({"max_tokens": 3}), 400, "missing_field", "prompt")
    e = _error(post({"prompt": "x", "temperature": -1}), 400, "invalid_value", "temperature")
    assert "temperature=-1" in e["message"]
    e = _error(post({"prompt": "x", "top_p": 0}), 400, param="top_p")
    e = _error(post({"prompt": "x", "logprobs": 99}), 400, param="logprobs")
    e = _error(post({"prompt": "x", "logit_bias": {"abc": 1}}), 400, param="logit_bias")
    e = _error(post({"prompt": "x", "logit_bias": {"99999999": 1}}), 400)
    assert "vocabulary" in e["message"]
    e = _error(post({"prompt": "x", "grammar": "root ::= nonsense("}), 400, param="grammar")
    still_serves(server)
    e = _error(post({"prompt": "x", "n": 10_000}), 400, param="n")
    e = _error(post({"prompt": ["x"] * 1000}), 400, param="prompt")
    e = _error(post({"prompt": "x", "echo": True}), 400, "unsupported", "echo")
    e = _error(post({"prompt": "x", "best_of": 3}), 400, "unsupported", "best_of")
    e = _error(post({"prompt": "word " * 2000}), 400, "context_length_exceeded", "prompt")
    e = _error(post({"prompt": ["ok", "word " * 2000]}), 400, "context_length_exceeded", "prompt[1]")
    e = _error(post({"prompt": ""}), 400, param="prompt")
    still_serves(server)
    e = _error(post({"prompt": "x" * (3 * 1024 * 1024)}), 413, "body_too_large")
    e = _error(http.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}),
               401, "invalid_api_key")
    no_key = httpx.Client(base_url=server.url, timeout=30)
    _error(no_key.post("/v1/completions", json={"prompt": "x"}), 401, "invalid_api_key")
    _error(no_key.get("/v1/models"), 401)
    assert no_key.get("/health").status_code == 200  # health needs no key
    _error(http.get("/v1/nothing-here"), 404, "not_found")
    _error(http.get("/v1/completions"), 405)
    chat = lambda body: http.post("/v1/chat/completions", json=body)  # noqa: E731
    _error(chat({"messages": []}), 400, param="messages")
    _error(chat({"messages": [{"role": "user"}]}), 400)
    _error(chat({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400, param="top_logprobs")
    _error(chat({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}), 400)
    still_serves(server)
    # The openai client raises its typed errors on these bodies.
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as exc:
        server.client().completions.create(model=ALIAS, prompt="x", temperature=-3)
    assert exc.value.body["param"] == "temperature"
    assert "parallel_gen_requests_rejected_total" in http.get("/metrics").text
    still_serves(server)


# -- the clients people use: any model name, nulls, routes without /v1 ------------------------
CHAT = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What colour is the sky?"}]


def test_any_model_name_gets_the_served_model(server):
    client = server.client()
    want = client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=8, temperature=0)
    # LangChain's and llama-index's defaults, a tutorial's name, an empty one, another case.
    for name in ("gpt-3.5-turbo", "gpt-4o", "", "SMOL"):
        r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0)
        assert r.model == ALIAS and r.choices[0].message.content == want.choices[0].message.content
    assert client.completions.create(model="davinci-002", prompt="Hi", max_tokens=2).model == ALIAS
    r = server.http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})  # no model at all
    assert r.status_code == 200 and r.json()["model"] == ALIAS
    assert client.models.retrieve(ALIAS).id == ALIAS
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("gpt-4o")  # /v1/models tells what is served
    assert exc.value.body["code"] == "model_not_found" and ALIAS in exc.value.body["message"]


def test_null_means_unset(server):
    client = server.client()
    # The openai SDK sends an explicit None as null, as LangChain and others do for unset fields.
    unset = dict(n=None, stream=None, stream_options=None, logprobs=None, top_logprobs=None, temperature=None,
                 top_p=None, presence_penalty=None, frequency_penalty=None, stop=None, logit_bias=None,
                 response_format=None, max_tokens=None, user=None)
    want = client.chat.completions.create(model=ALIAS, messages=CHAT, max_completion_tokens=8, seed=3)
    got = client.chat.completions.create(model=ALIAS, messages=CHAT, max_completion_tokens=8, seed=3, **unset)
    assert [c.message.content for c in got.choices] == [want.choices[0].message.content]
    assert got.usage.completion_tokens == want.usage.completion_tokens
    r = server.http.post("/v1/completions", json={
        "prompt": PROMPTS[0], "temperature": 0, "n": None, "echo": None, "best_of": None, "suffix": None,
        "logprobs": None, "max_tokens": None, "stream": None, "stream_options": None, "seed": None, "stop": None,
        "ignore_eos": None, "grammar": None, "json_schema": None, "top_k": None, "model": None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1 and body["choices"][0]["logprobs"] is None
    assert body["usage"]["completion_tokens"] <= 16  # max_tokens null: OpenAI's default for completions
    want = client.completions.create(model=ALIAS, prompt=PROMPTS[0], temperature=0)
    assert body["choices"][0]["text"] == want.choices[0].text
    # Nulls inside nested objects too, and an assistant turn whose content is null.
    r = server.http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi", "name": None}, {"role": "assistant", "content": None},
                     {"role": "user", "content": "Name a fruit."}],
        "max_tokens": 4, "stream_options": {"include_usage": None}, "response_format": {"type": "text",
                                                                                         "json_schema": None}})
    assert r.status_code == 200, r.text
    _error(server.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": None}]}), 400,
           "invalid_value", "messages[0]")


def test_unknown_nested_keys_are_ignored(server):
    client = server.client()
    messages = [{"role": "developer", "content": "Answer in one word."},  # OpenAI's newer name for system
                {"role": "user", "content": "What colour is the sky?", "name": "ann"}]
    want = client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(
        model=ALIAS, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 10}}, "required": ["colour"]}
    r = client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=30, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "c", "description": "a colour", "schema": schema, "strict": None}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_routes_answer_without_the_v1_prefix(server):
    client = server.client(prefix="")
    assert [m.id for m in client.models.list().data] == [ALIAS]
    assert client.models.retrieve(ALIAS).id == ALIAS
    chat = client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == server.client().chat.completions.create(
        model=ALIAS, messages=CHAT, max_tokens=8, temperature=0).choices[0].message.content
    assert client.completions.create(model="x", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    assert client.responses.create(model="x", input="Hi", max_output_tokens=2).usage.output_tokens == 2
    r = server.http.post("/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "np-1"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-np-1"
    _error(httpx.post(server.url + "/chat/completions", json={"messages": CHAT}), 401, "invalid_api_key")


# -- the Responses API -------------------------------------------------------------------------
def test_responses_is_the_chat_answer(server):
    client = server.client()
    chat = client.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=16, temperature=0)
    r = client.responses.create(model="gpt-4.1", input=[{"role": "system", "content": CHAT[0]["content"]},
                                                        {"role": "user", "content": CHAT[1]["content"]}],
                                max_output_tokens=16, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == ALIAS
    assert r.output[0].type == "message" and r.output[0].id.startswith("msg_") and r.output[0].role == "assistant"
    assert r.output_text == chat.choices[0].message.content
    assert r.status == ("completed" if chat.choices[0].finish_reason == "stop" else "incomplete")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # instructions are the system turn; a string input the user turn; content parts are joined.
    same = client.responses.create(model=ALIAS, instructions=CHAT[0]["content"], input=CHAT[1]["content"],
                                   max_output_tokens=16, temperature=0)
    parts = client.responses.create(model=ALIAS, instructions=CHAT[0]["content"], max_output_tokens=16, temperature=0,
                                    input=[{"type": "message", "role": "user", "content": [
                                        {"type": "input_text", "text": "What colour is "},
                                        {"type": "input_text", "text": "the sky?"}]}])
    assert same.output_text == parts.output_text == r.output_text and same.instructions == CHAT[0]["content"]
    short = client.responses.create(model=ALIAS, input="Tell me a story.", max_output_tokens=3, temperature=0,
                                    extra_body={"reasoning": None, "metadata": {"k": "v"}})
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 3 and short.metadata == {"k": "v"}


def test_responses_stream_events(server):
    client = server.client()
    whole = client.responses.create(model=ALIAS, input="Name a fruit.", max_output_tokens=12, temperature=0)
    events = list(client.responses.create(model="gpt-4.1", input="Name a fruit.", max_output_tokens=12,
                                          temperature=0, stream=True))
    types = [e.type for e in events]
    final = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", final]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    rid, item = events[0].response.id, events[2].item.id
    assert rid.startswith("resp_") and item.startswith("msg_") and events[0].response.status == "in_progress"
    assert all(e.item_id == item for e in events[3:-2]) and events[-2].item.id == item and events[-1].response.id == rid
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    # The SDK's own stream helper accumulates the events into the final response.
    with client.responses.stream(model=ALIAS, input="Name a colour.", instructions="Answer in one word.",
                                 max_output_tokens=60, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas) and deltas


def test_responses_json_schema_plain_and_streamed(server):
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    client = server.client()
    r = client.responses.parse(model=ALIAS, input="Describe a person as JSON.", text_format=Person,
                               max_output_tokens=60, temperature=0)
    assert r.status == "completed" and isinstance(r.output_parsed, Person)
    assert r.text.format.type == "json_schema"
    schema = {"type": "object", "properties": {"fruit": {"type": "string", "maxLength": 12},
                                               "colour": {"type": "string", "maxLength": 12}},
              "required": ["fruit", "colour"], "additionalProperties": False}
    events = list(client.responses.create(
        model=ALIAS, input="Name a fruit and its colour.", max_output_tokens=60, temperature=0.8, stream=True,
        text={"format": {"type": "json_schema", "name": "fruit", "schema": schema, "strict": True}}))
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    jsonschema.validate(json.loads(text), schema)
    obj = client.responses.create(model=ALIAS, input="Give me JSON.", max_output_tokens=40, temperature=0,
                                  text={"format": {"type": "json_object"}})
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


def test_responses_errors_name_the_field(server):
    client = server.client()

    def bad(**kw):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=ALIAS, **{"input": "Hi", **kw})
        return exc.value.body

    assert bad(store=True)["param"] == "store"
    e = bad(previous_response_id="resp_123")
    assert e["param"] == "previous_response_id" and "whole conversation" in e["message"]
    assert bad(max_output_tokens=0)["param"] == "max_output_tokens"
    assert bad(temperature=-1)["param"] == "temperature"
    e = bad(input="word " * 2000)
    assert e["param"] == "input" and e["code"] == "context_length_exceeded"
    e = bad(input=[{"type": "function_call_output", "call_id": "c1", "output": "42"}])
    assert e["param"] == "input[0]" and "function_call_output" in e["message"]
    assert bad(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])["param"] \
        .startswith("input[0].content[0]")
    assert bad(input=[])["param"] == "input"
    assert bad(text={"format": {"type": "json_schema", "name": "x"}})["param"] == "text.format"
    e = bad(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}})
    assert e["param"] == "text.format.schema"
    assert client.responses.create(model=ALIAS, input="Hi", store=False, max_output_tokens=2).status == "incomplete"
    still_serves(server)


# -- CORS, model names -------------------------------------------------------------------------
ORIGIN = "http://localhost:5173"


def _preflight(url, origin=ORIGIN):
    return httpx.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_is_off_by_default(server):
    r = _preflight(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = server.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # a page cannot read it
    # What a page may send without a preflight (a "simple" request, text/plain) starts nothing.
    r = server.http.post("/v1/completions", content=json.dumps({"prompt": "Hi", "max_tokens": 1}),
                         headers={"Origin": ORIGIN, "Content-Type": "text/plain"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


@pytest.fixture(scope="module")
def configured(smollm2_path):
    s = Server(smollm2_path, "--n-parallel", "2", "--served-model-name", "first", "second", "--strict-model-name",
               "--allowed-origins", ORIGIN, "https://app.example", names=())
    yield s
    s.stop()


def test_cors_preflight_and_headers_when_on(configured):
    for path in ("/v1/chat/completions", "/responses"):
        r = _preflight(configured.url + path)  # no key: a preflight never carries one
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = _preflight(configured.url + "/v1/chat/completions", origin="https://evil.example")
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = configured.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                             headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    # Errors are readable by the page too; another origin gets no CORS header.
    r = httpx.post(configured.url + "/v1/completions", json={"prompt": "Hi"}, headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = configured.http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_served_model_names_and_strict_model_name(configured):
    client = configured.client()
    assert [m.id for m in client.models.list().data] == ["first", "second"]
    assert client.models.retrieve("second").id == "second"
    r = client.chat.completions.create(model="second", messages=CHAT, max_tokens=2)
    assert r.model == "first"  # answers carry the first name
    assert client.responses.create(model="first", input="Hi", max_output_tokens=2).model == "first"
    for call in (lambda: client.chat.completions.create(model="gpt-3.5-turbo", messages=CHAT, max_tokens=2),
                 lambda: client.completions.create(model="First", prompt="Hi", max_tokens=2),
                 lambda: client.responses.create(model="gpt-4.1", input="Hi")):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert exc.value.body["param"] == "model" and exc.value.body["code"] == "model_not_found"
        assert "'first', 'second'" in exc.value.body["message"]
    r = configured.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})  # no name: the one model
    assert r.status_code == 200 and r.json()["model"] == "first"


# -- an agent framework, configured as for OpenAI ------------------------------------------------
def test_pydantic_ai_agent_invoke_stream_and_structured_output(server):
    from pydantic import BaseModel
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    class City(BaseModel):
        name: str
        country: str

    provider = OpenAIProvider(base_url=server.url + "/v1", api_key=server.key)
    settings = ModelSettings(temperature=0, max_tokens=40)
    want = server.client().chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=40, temperature=0)
    # pydantic-ai needs some model name: the one it would use with OpenAI, not this server's.
    for model in (OpenAIChatModel("gpt-4o", provider=provider), OpenAIResponsesModel("gpt-4o", provider=provider)):
        agent = Agent(model, instructions=CHAT[0]["content"], model_settings=settings)
        result = agent.run_sync(CHAT[1]["content"])
        assert result.output == want.choices[0].message.content
        assert result.usage.input_tokens == want.usage.prompt_tokens
        with agent.run_stream_sync(CHAT[1]["content"]) as stream:
            # debounce_by=None: every delta as it arrives (pydantic-ai groups those within its
            # 0.1 s window by default, so a fast machine could send the whole answer in one)
            deltas = list(stream.stream_text(delta=True, debounce_by=None))
        assert "".join(deltas) == want.choices[0].message.content and len(deltas) > 1
        structured = Agent(model, output_type=NativeOutput(City), model_settings=ModelSettings(temperature=0,
                                                                                                max_tokens=80))
        city = structured.run_sync("Name a city in France.").output
        assert isinstance(city, City) and city.name and city.country


# -- many clients, one batch ------------------------------------------------------------------
def test_32_concurrent_clients_share_the_batch_and_get_in_process_answers(server, local):
    from conftest import PROMPTS_16

    prompts = [f"{p}" for p in PROMPTS_16] + [f"{p} and" for p in PROMPTS_16]
    want = pg.generate_parallel(local, prompts, max_tokens=16, temperature=0)
    calls_before = server.metric("parallel_gen_engine_decode_calls")
    tokens_before = server.metric("parallel_gen_engine_tokens_generated")

    def ask(i):
        client = server.client()
        if i % 2:
            chunks = client.completions.create(model=ALIAS, prompt=prompts[i], max_tokens=16, temperature=0,
                                               stream=True)
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)
        return client.completions.create(model=ALIAS, prompt=prompts[i], max_tokens=16, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    assert got == [c.text for c in want]
    calls = server.metric("parallel_gen_engine_decode_calls") - calls_before
    tokens = server.metric("parallel_gen_engine_tokens_generated") - tokens_before
    assert tokens == sum(len(c.token_ids) for c in want)
    # Alone, every token would need its own decode call (plus a prefill each): shared steps
    # decode several sequences per call. How many share depends on how the 32 requests
    # arrive (a loaded machine staggers them), so the bound is only that they shared.
    assert calls < tokens, (calls, tokens)


# -- a small server for cancellation and backpressure -------------------------------------------
@pytest.fixture()
def small(smollm2_path):
    s = Server(smollm2_path, "--n-parallel", "2", "--max-queue", "2", key=None)
    yield s
    s.stop()


def _wait(pred, timeout=120):
    """Whether ``pred`` became true within ``timeout`` seconds: a hang guard, not a speed
    check (a loaded machine stretches seconds; what a test claims is counted in tokens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


LONG = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def test_disconnect_mid_stream_frees_the_slot(small):
    other = concurrent.futures.ThreadPoolExecutor(1).submit(
        small.client().completions.create, model=ALIAS, prompt="Hello", max_tokens=40, temperature=0,
        extra_body={"ignore_eos": True})
    with httpx.Client(base_url=small.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert small.metric("parallel_gen_slots_busy") >= 1
    # the connection is closed here
    assert _wait(lambda: small.metric("parallel_gen_kv_tokens") <= 60 and
                 small.metric("parallel_gen_requests_running") + small.metric("parallel_gen_requests_waiting") <= 1)
    r = other.result(120)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 40
    assert _wait(lambda: small.metric("parallel_gen_slots_busy") == 0)
    assert small.metric("parallel_gen_sequences_finished_total", '{finish_reason="cancelled"}') >= 1
    # Freed at once, counted in tokens: the stream read 6 lines, and its sequence stopped
    # far short of its 400 (the other request made 40).
    assert small.metric("parallel_gen_engine_tokens_generated") - 40 <= 100


def test_disconnect_while_waiting_for_a_whole_response(small):
    c = httpx.Client(base_url=small.url, timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=LONG)
    c.close()
    assert _wait(lambda: small.metric("parallel_gen_slots_busy") == 0)
    assert small.metric("parallel_gen_engine_tokens_generated") < LONG["max_tokens"]  # stopped, not run out


def test_queue_full_gets_429_then_succeeds_once_drained(small):
    pool = concurrent.futures.ThreadPoolExecutor(4)
    http = httpx.Client(base_url=small.url, timeout=120)
    # 2 slots + 2 waiting: four one-sequence requests fill the server.
    busy = [pool.submit(http.post, "/v1/completions", json={**LONG, "max_tokens": 120}) for _ in range(4)]
    assert _wait(lambda: small.metric("parallel_gen_slots_busy") == 2 and
                 small.metric("parallel_gen_requests_waiting") + small.metric("parallel_gen_requests_running") == 4)
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    e = _error(r, 429, "queue_full")
    assert r.headers["retry-after"] == "1"
    assert "waiting" in e["message"]
    with pytest.raises(openai.RateLimitError):
        small.client().completions.create(model=ALIAS, prompt="Hi", max_tokens=2)
    for f in busy:
        assert f.result(120).status_code == 200
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
    assert small.metric("parallel_gen_requests_rejected_total", '{reason="queue_full"}') == 2


def test_sigterm_finishes_running_work_and_exits_0(small):
    pool = concurrent.futures.ThreadPoolExecutor(2)
    running = pool.submit(httpx.post, small.url + "/v1/completions",
                          json={"prompt": "Hi", "max_tokens": 30, "ignore_eos": True}, timeout=60)

    def stream():
        chunks = small.client().completions.create(model=ALIAS, prompt="Hello", max_tokens=30, stream=True,
                                                   extra_body={"ignore_eos": True})
        return [c.choices[0].finish_reason for c in chunks if c.choices]

    streaming = pool.submit(stream)
    assert _wait(lambda: small.metric("parallel_gen_slots_busy") == 2)
    small.proc.send_signal(signal.SIGTERM)
    assert small.proc.wait(30) == 0
    r = running.result(30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 30, (r.status_code, r.text)
    assert streaming.result(30)[-1] == "length"  # the stream ran to its end within the grace period
    assert "Traceback" not in "".join(small.lines)


def test_serve_cli_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    run = lambda *a: subprocess.run([sys.executable, "-m", "parallel_gen", "serve", "--port", "0", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    r = run("-m", str(tmp_path / "missing.gguf"))
    assert r.returncode == 1 and "missing.gguf" in r.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    r = run("-m", str(bad))
    assert r.returncode == 1 and "failed to load" in r.stderr
    empty = tmp_path / "key"
    empty.write_text("\n")
    r = run("-m", str(bad), "--api-key-file", str(empty))
    assert r.returncode == 2 and "empty" in r.stderr
    r = run("--max-queue", "-1")
    assert r.returncode == 2 and "max_queue" in r.stderr
    r = run("--allowed-origins", "http://localhost:3000/")
    assert r.returncode == 2 and "trailing slash" in r.stderr
