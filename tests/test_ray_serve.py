"""The OpenAI server on Ray Serve (parallel_gen.ray.serve): a real local Ray cluster, one
Serve app for the module (2 model replicas x 1 thread of SmolLM2, an API key, the Hermes
tools template), real HTTP clients (openai, httpx).

- every route answers through the ingress and names its replica (x-replica-id);
- sessions (header, ``user``, ``prompt_cache_key``) stay on one replica and hit its KV;
- without session ids, conversations with distinct long prefixes do the same;
- a killed replica: its stream in flight ends with a retryable error, later requests succeed.
The routing policy itself is tested without Ray in test_ray_routing.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import import_extra

import_extra("ray.serve", "rayserve")  # not installed: a skip, or a failure under PG_REQUIRE_EXTRAS=1 (make test)

import httpx  # noqa: E402
import openai  # noqa: E402
import ray  # noqa: E402

from parallel_gen.ray import serve  # noqa: E402
from test_tools import HERMES, TOOLS, WEATHER, user  # noqa: E402

KEY = "serve-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TURNS = 5
# ~300 tokens shared by every session's conversation
SYSTEM = "You are a concise assistant for a travel agency. " + " ".join(
    f"Rule {i}: answer in one short sentence, mention no prices, and stay polite to customer number {i}."
    for i in range(16))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_on_ray_until_sigterm(smollm2_path, tmp_path):
    """``parallel-gen serve --ray``: its own local cluster (first in the module, before the
    module's), one replica, answers with its replica named; a rewritten keys file is in force
    within seconds (no signal reaches a replica: it rereads the file when it changes);
    SIGTERM stops it and its cluster."""
    port = free_port()
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "alice", "key": KEY}]}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen([sys.executable, "-m", "parallel_gen", "serve", "--ray", "--model", str(smollm2_path),
                          "--replicas", "1", "--threads", "1", "--n-parallel", "2", "--n-ctx", "512", "--port",
                          str(port), "--api-keys", str(keys)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):  # until it answers (0.5 s apart), or it exits
            assert p.poll() is None, p.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = {"messages": user("Hi"), "max_tokens": 3, "temperature": 0}
        r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60, json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1 and r.headers["x-replica-id"]
        bob = {"X-Api-Key": "bob-secret"}
        assert httpx.post(url + "/v1/chat/completions", headers=bob, timeout=60, json=body).status_code == 401
        keys.write_text(json.dumps({"keys": [{"name": "bob", "key": "bob-secret"}]}))
        for _ in range(60):  # within a few of the replica's 2 s checks
            if httpx.post(url + "/v1/chat/completions", headers=bob, timeout=60, json=body).status_code == 200:
                break
            time.sleep(0.5)
        assert httpx.post(url + "/v1/chat/completions", headers=bob, timeout=60, json=body).status_code == 200
        gone = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60, json=body)
        assert gone.status_code == 401 and gone.json()["error"]["code"] == "invalid_api_key"
        p.send_signal(signal.SIGTERM)
        # It stops its deployment and its cluster, waits for the port to close, and exits 0.
        assert p.wait(120) == 0, p.stderr.read()
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def app(smollm2_path):
    a = serve(smollm2_path, replicas=2, port=free_port(), name="pg_test",
              model_options=dict(n_threads=1, n_parallel=4, n_ctx=1024), api_key=KEY, chat_template=HERMES)
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client, messages, headers=None, **kw):
    """(the completion, the replica that served it)."""
    raw = client.chat.completions.with_raw_response.create(
        model="any", messages=messages, temperature=0, max_tokens=kw.pop("max_tokens", 12),
        extra_headers=headers or {}, **kw)
    return raw.parse(), raw.headers["x-replica-id"]


def test_every_route_answers_through_serve(app, client):
    c, replica = chat(client, user("Say hello."))
    assert c.choices[0].message.content and c.usage.completion_tokens >= 1 and replica

    stream = client.chat.completions.create(model="any", messages=user("Count to three."), max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) and chunks[-1].usage

    done = client.completions.create(model="any", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens >= 1

    tools, _ = chat(client, user("What is the weather in Paris?"), tools=TOOLS, max_tokens=80,
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = tools.choices[0].message.tool_calls[0]
    assert call.function.name == WEATHER["function"]["name"] and "city" in json.loads(call.function.arguments)

    r = client.responses.create(model="any", input="Say hi.", max_output_tokens=8, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text  # incomplete: max_output_tokens
    events = [e.type for e in client.responses.create(model="any", input="Say hi.", max_output_tokens=8,
                                                      temperature=0, stream=True)]
    assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete")

    assert len(client.models.list().data) == 1
    with httpx.Client(base_url=app.url, timeout=60) as h:
        assert h.get("/health").json() == {"status": "ok"}
        bad = h.post("/v1/chat/completions", headers=AUTH, json={"messages": user("x"), "max_tokens": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        assert bad.headers["x-replica-id"]  # the replica's own error answer, passed through
        refused = h.post("/v1/chat/completions", json={"messages": user("x")})  # no key
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert h.get("/metrics").status_code == 401


def run_sessions(client, sessions):
    """Each (headers, extra body, messages) conversation for TURNS turns, the sessions at
    once; per session: [(replica, cached_tokens)] by turn."""
    def one(session):
        headers, extra, messages = session
        out = []
        for turn in range(TURNS):
            messages = messages + [{"role": "user", "content": f"Question {turn}: name a city to visit."}]
            c, replica = chat(client, messages, headers=headers, extra_body=extra)
            out.append((replica, c.usage.prompt_tokens_details.cached_tokens))
            messages = messages + [{"role": "assistant", "content": c.choices[0].message.content}]
        return out

    with ThreadPoolExecutor(len(sessions)) as pool:
        return list(pool.map(one, sessions))


def assert_sticky_and_cached(runs):
    later = [cached for run in runs for _, cached in run[1:]]
    assert sum(c > 0 for c in later) >= 0.9 * len(later), runs
    for run in runs:
        assert len({replica for replica, _ in run}) == 1, run  # each conversation on one replica


def test_sessions_stay_on_their_replica_and_hit_its_cache(client):
    system = [{"role": "system", "content": SYSTEM}]
    sessions = [({"X-Session-Id": "alice"}, {}, system), ({"X-Session-Id": "bob"}, {}, system),
                ({}, {"user": "carol"}, system), ({}, {"prompt_cache_key": "dave"}, system)]
    assert_sticky_and_cached(run_sessions(client, sessions))


def test_prefix_routing_keeps_conversations_without_session_ids(client):
    sessions = [({}, {}, [{"role": "system", "content": f"Conversation {k} of {k * 37}: {SYSTEM}"}])
                for k in range(4)]
    assert_sticky_and_cached(run_sessions(client, sessions))


def test_metrics_gather_every_replica(app, client):
    with httpx.Client(base_url=app.url, timeout=60) as h:
        text = h.get("/metrics", headers=AUTH).text
    prompt_tokens = {line.split('replica="')[1].split('"')[0]: float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("parallel_gen_prompt_tokens_total{")}
    assert len(prompt_tokens) == 2 and sum(prompt_tokens.values()) > 0, text  # one sample per replica
    assert "# TYPE parallel_gen_prompt_tokens_total counter" in text


def _replica_actor(replica_id: str):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(f"#Model#{replica_id}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")


def test_a_killed_replica_fails_its_stream_retryably_and_the_others_serve(app):
    headers = {**AUTH, "X-Session-Id": "victim"}
    body = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "temperature": 0, "stream": True}
    # a read timeout fails the test: the stream must end, never hang
    with httpx.Client(base_url=app.url, timeout=httpx.Timeout(60)) as h:
        with h.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            victim = r.headers["x-replica-id"]
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            ray.kill(_replica_actor(victim))
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert error["code"] == "replica_unavailable", rest[-3:]

        answers = []
        for _ in range(20):  # the router drops the dead replica; Serve starts a new one
            r = h.post("/v1/chat/completions", headers=headers,
                       json={"messages": user("Hello again."), "max_tokens": 4, "temperature": 0})
            answers.append(r.status_code)
            if r.status_code == 200:
                assert r.headers["x-replica-id"] != victim
                break
            assert r.status_code == 503 and r.json()["error"]["code"] == "replica_unavailable"
            assert r.headers["retry-after"]
        assert answers[-1] == 200, answers


def test_cli_refuses_bad_ray_options():
    for args, why in ((["--replicas", "0"], "replicas"), (["--min-replicas", "3", "--max-replicas", "2"], "replicas"),
                      (["--target-ongoing-requests", "4"], "min_replicas or max_replicas")):
        p = subprocess.run([sys.executable, "-m", "parallel_gen", "serve", "--ray", *args],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and why in p.stderr and "Traceback" not in p.stderr, p.stderr
