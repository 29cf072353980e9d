"""Many users on one server (issue 29): API keys with limits, fair admission across keys,
the result cache and the rate-limit counters in Redis. Real server processes, a real
redis-server on a free loopback port, real HTTP clients; limits are checked by counting
requests and tokens, fairness by counting finished sequences, never by timing."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import parallel_gen as pg
from parallel_gen.server.keys import KeyTable
from test_server import PYTHON_DIR, Server, _error, _wait

KEYS = {"alice": "sk-alice-0001", "bob": "sk-bob-0002", "carol": "sk-carol-0003", "dave": "sk-dave-0004"}


def keys_file(path, entries):
    path.write_text(json.dumps({"keys": entries}))
    return path


def as_key(name, **limits):
    return {"name": name, "key": KEYS[name], **limits}


def http(server, name=None, key=None, timeout=120):
    key = key or KEYS[name]
    return httpx.Client(base_url=server.url, timeout=timeout, headers={"Authorization": f"Bearer {key}"})


def ask(c, **kw):
    return c.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 1, "temperature": 0, **kw})


# -- the keys file -------------------------------------------------------------------------
def test_keys_file_is_checked_and_names_what_is_wrong(tmp_path, smollm2_path):
    digest = hashlib.sha256(b"sk-bob-0002").hexdigest()
    table = KeyTable.parse({"keys": [as_key("alice", rpm=60, tpm=100, max_concurrent=8, weight=2),
                                     {"name": "bob", "sha256": digest.upper()}]})
    assert table.find("sk-bob-0002").name == "bob" and table.find("sk-alice-0001").weight == 2
    assert table.find("sk-nobody") is None and table.find("") is None
    bad = {
        "unknown fields budget, rmp": {"keys": [{**as_key("alice"), "rmp": 3, "budget": 1}]},
        "exactly one of key and sha256": {"keys": [{**as_key("alice"), "sha256": digest}]},
        "sha256: must be 64 hex digits": {"keys": [{"name": "bob", "sha256": "abc"}]},
        "rpm=0: must be an integer >= 1": {"keys": [as_key("alice", rpm=0)]},
        "weight='2': must be an integer": {"keys": [as_key("alice", weight="2")]},
        "names must be unique: alice": {"keys": [as_key("alice"), {"name": "alice", "sha256": digest}]},
        "keys[0].name=None": {"keys": [{"key": KEYS["alice"]}]},
        "unknown fields: users": {"keys": [], "users": []},
        "at least one": {"keys": []},
    }
    for words, data in bad.items():
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
            KeyTable.parse(data)
    # At startup: a clear error naming the field, exit status 2, no traceback.
    path = keys_file(tmp_path / "keys.json", [{**as_key("alice"), "rpm_limit": 3}])
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR}
    r = subprocess.run([sys.executable, "-m", "parallel_gen", "serve", "-m", str(smollm2_path), "--port", "0",
                        "--api-keys", str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "rpm_limit" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert KEYS["alice"] not in r.stderr


# -- one server, four keys with limits -------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(smollm2_path, tmp_path_factory):
    path = keys_file(tmp_path_factory.mktemp("keys") / "keys.json", [
        as_key("alice", rpm=3), {"name": "bob", "sha256": hashlib.sha256(KEYS["bob"].encode()).hexdigest(),
                                 "tpm": 60},
        as_key("carol", max_concurrent=2), as_key("dave")])
    s = Server(smollm2_path, "--n-parallel", "2", "--max-queue", "3", "--api-keys", path, key=None, names=())
    s.keys_path = path
    s.http = http(s, "dave")  # Server.metric() reads /metrics with it
    yield s
    s.stop()


def test_401_in_openai_shape_and_both_headers_accepted(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        assert c.get("/health").status_code == 200  # no key needed
        e = _error(c.post("/v1/completions", json={"prompt": "Hi"}), 401, "invalid_api_key")
        assert "X-Api-Key" in e["message"]
        _error(c.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-key"}), 401, "invalid_api_key")
        _error(c.get("/metrics", headers={"X-Api-Key": "sk-wrong-key"}), 401, "invalid_api_key")
        _error(c.get("/v1/models", headers={"Authorization": f"Basic {KEYS['dave']}"}), 401, "invalid_api_key")
        assert c.get("/v1/models", headers={"X-Api-Key": KEYS["dave"]}).status_code == 200
        r = c.post("/v1/completions", headers={"X-Api-Key": KEYS["dave"]}, json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert r.json()["usage"]["completion_tokens"] >= 1
    # The official client sends Bearer.
    import openai
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEYS["carol"], max_retries=0)
    assert client.completions.create(model="x", prompt="Hi", max_tokens=1).usage.completion_tokens == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-nope", max_retries=0).models.list()


def _limited(r, limit):
    e = _error(r, 429, "rate_limit_exceeded")
    assert f"{limit}=" in e["message"] and e["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    return e


def test_rpm_limit(keyed):
    with http(keyed, "alice") as c:
        for _ in range(3):
            assert ask(c).status_code == 200
        e = _limited(ask(c), "rpm")
        assert "alice" in e["message"] and KEYS["alice"] not in e["message"]
        _limited(ask(c), "rpm")
    with http(keyed, "dave") as c:  # another key is not limited by alice's use
        assert ask(c).status_code == 200
    assert keyed.metric("parallel_gen_key_rate_limited_total", '{key="alice",limit="rpm"}') == 2
    assert keyed.metric("parallel_gen_key_requests_total", '{key="alice"}') == 3


def test_tpm_limit_counts_prompt_and_completion_tokens(keyed):
    with http(keyed, "bob") as c:
        first = ask(c, max_tokens=40, ignore_eos=True)
        used = first.json()["usage"]["total_tokens"]
        assert first.status_code == 200 and 40 < used < 60
        assert ask(c, max_tokens=40, ignore_eos=True).status_code == 200  # 45-odd of 60 used before it
        e = _limited(ask(c), "tpm")
        assert "tpm=60" in e["message"]
    assert keyed.metric("parallel_gen_key_prompt_tokens_total", '{key="bob"}') + \
        keyed.metric("parallel_gen_key_completion_tokens_total", '{key="bob"}') == 2 * used


LONG = {"max_tokens": 300, "ignore_eos": True, "temperature": 0, "stream": True}


def test_max_concurrent_counts_sequences_in_flight(keyed):
    with http(keyed, "carol") as c:
        _error(ask(c, prompt=["a", "b", "c"]), 400, "invalid_value")  # could never run
        with c.stream("POST", "/v1/completions", json={"prompt": ["Once", "Twice"], **LONG}) as r:
            lines = r.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(4))
            e = _limited(ask(c), "max_concurrent")
            assert "2 now" in e["message"]
            # Refused before the call is built: a schema that cannot be converted (a 400 once
            # admitted) and a chat history that cannot be parsed cost no work, the 429 comes first.
            _limited(ask(c, json_schema={"type": "object", "properties": {"a": {"$ref": "#/definitions/no"}}}),
                     "max_concurrent")
            _limited(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}, {
                "role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
                    "name": "f", "arguments": "{not json"}}]}], "max_tokens": 1}), "max_concurrent")
        # the stream is closed: its sequences are cancelled and let go
        assert _wait(lambda: keyed.metric("parallel_gen_key_sequences_in_flight", '{key="carol"}') == 0)
        assert ask(c, prompt=["a", "b"]).status_code == 200
        _error(ask(c, json_schema={"type": "object", "properties": {"a": {"$ref": "#/definitions/no"}}}), 400,
               param="json_schema")  # admitted now: the conversion finds the error
    assert keyed.metric("parallel_gen_key_rate_limited_total", '{key="carol",limit="max_concurrent"}') == 3


def test_one_key_filling_its_queue_does_not_refuse_the_others(keyed):
    # 2 slots + max_queue 3: dave may hold 5 sequences.
    pool = concurrent.futures.ThreadPoolExecutor(5)
    stop = threading.Event()

    def hold():
        with http(keyed, "dave") as c, c.stream("POST", "/v1/completions", json={"prompt": "Hi", **LONG}) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return r.status_code
            return r.status_code

    held = [pool.submit(hold) for _ in range(5)]
    try:
        assert _wait(lambda: keyed.metric("parallel_gen_key_sequences_in_flight", '{key="dave"}') == 5)
        with http(keyed, "dave") as c:
            e = _error(ask(c), 429, "queue_full")
            assert "dave" in e["message"]
        with http(keyed, "carol") as c:  # waits for a slot, but is not refused
            assert ask(c).status_code == 200
    finally:
        stop.set()
        assert all(f.result(120) == 200 for f in held)
    assert keyed.metric("parallel_gen_key_rate_limited_total", '{key="dave",limit="queue"}') == 1


def test_keys_never_reach_logs_or_metrics(keyed):
    with http(keyed, "dave") as c:
        text = c.get("/metrics").text
    assert 'key="dave"' in text
    logs = "".join(keyed.lines)
    for key in KEYS.values():
        assert key not in text and key not in logs


def test_sighup_reloads_keys_without_dropping_requests(keyed):
    with http(keyed, "dave") as c, c.stream("POST", "/v1/completions",
                                            json={"prompt": "Hi", **LONG, "max_tokens": 60}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        old = json.loads(keyed.keys_path.read_text())
        keys_file(keyed.keys_path, old["keys"] + [{"name": "erin", "key": "sk-erin-0005"}])
        keyed.proc.send_signal(signal.SIGHUP)
        with http(keyed, key="sk-erin-0005") as e:
            assert _wait(lambda: ask(e).status_code == 200)
        # A bad file keeps the keys in force.
        keyed.keys_path.write_text('{"keys": [{"name": "erin", "key": "sk-erin-0005", "rpn": 1}]}')
        keyed.proc.send_signal(signal.SIGHUP)
        assert _wait(lambda: any("not reloaded" in line and "rpn" in line for line in keyed.lines))
        assert ask(c).status_code == 200
        rest = [line for line in lines if line.startswith("data: {")]
        assert json.loads(rest[-1][6:])["choices"][0]["finish_reason"] == "length"  # ran to its end
    keys_file(keyed.keys_path, old["keys"])


# -- fair admission ------------------------------------------------------------------------------
def _flood_then_one(server, n_parallel):
    """Key A sends 25 streamed requests of 8 prompts (200 sequences on n_parallel slots);
    once they all wait, key B sends one prompt. Returns how many of A's sequences finished
    before B's answer came back."""
    finished_a = []
    lock = threading.Lock()
    stop = threading.Event()
    body = {"prompt": [f"Story {i}:" for i in range(8)], "max_tokens": 12, "ignore_eos": True, "temperature": 0,
            "stream": True}

    def flood():
        with http(server, "alice") as c, c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if stop.is_set():
                    return
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["finish_reason"]:
                    with lock:
                        finished_a.append(1)

    pool = concurrent.futures.ThreadPoolExecutor(25)
    floods = [pool.submit(flood) for _ in range(25)]
    try:
        # All of A's requests admitted (none can finish yet: their 8 prompts take turns) and
        # most of their sequences waiting.
        assert _wait(lambda: server.metric("parallel_gen_key_sequences_in_flight", '{key="alice"}') == 200 and
                     server.metric("parallel_gen_sequences_waiting") >= 150)
        with http(server, "bob", timeout=600) as c:  # first come: behind some 40 of A's (a hang guard)
            r = ask(c, max_tokens=12, ignore_eos=True)
        with lock:
            before = len(finished_a)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
    finally:
        stop.set()
        for f in floods:
            f.result(300)
    return before


@pytest.mark.parametrize("fair", [True, False], ids=["fair", "first-come"])
def test_fair_admission_across_keys(smollm2_path, tmp_path, fair):
    path = keys_file(tmp_path / "keys.json", [as_key("alice"), {"name": "bob", "key": KEYS["bob"]}])
    s = Server(smollm2_path, "--n-parallel", "4", "--max-queue", "256", "--api-keys", path,
               *([] if fair else ["--no-fair-admission"]), key=None, names=())
    s.http = http(s, "bob")
    try:
        before = _flood_then_one(s, 4)
    finally:
        s.stop()
    print(f"fair={fair}: {before} of A's sequences finished before B's one")
    # Fair: B's sequence takes the next free slot, so it ends after at most the 4 of A's
    # running when it came and the 3 beside it; first come: behind a turn of each of A's
    # 25 requests and the engine's queue.
    if fair:
        assert before <= 2 * 4, before
    else:
        assert before > 2 * 4 + 8, before


# -- Redis: the result cache and shared limits ----------------------------------------------------
def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, no persistence."""

    def __init__(self):
        exe = shutil.which("redis-server")
        assert exe, "redis-server is missing: apt-get install redis-server (.ci/run installs it)"
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        self.client = redis.Redis.from_url(self.url)
        assert _wait(self._pings, 30), "redis-server did not start"

    def _pings(self):
        try:
            return self.client.ping()
        except Exception:
            return False

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def redis_server():
    r = RedisServer()
    yield r
    r.kill()


def test_redis_result_cache_in_process_and_redis_down(smol, redis_server, caplog):
    prompts = ["The capital of France is", "Water boils at"]
    first = pg.generate_parallel(smol, prompts, pg.SamplingParams(max_tokens=8, temperature=0),
                                 cache=redis_server.url)
    assert first.stats.cache_hits == 0
    with pg.ResultCache(redis_server.url, ttl=600) as cache:  # a fresh process's view: an empty LRU
        again = pg.generate_parallel(smol, prompts, pg.SamplingParams(max_tokens=8, temperature=0), cache=cache)
        assert again.stats.cache_hits == 2 and [c.text for c in again] == [c.text for c in first]
        assert cache.counts.hits == {"memory": 0, "redis": 2}
        pg.generate_parallel(smol, prompts, pg.SamplingParams(max_tokens=8, temperature=0), cache=cache)
        assert cache.counts.hits == {"memory": 2, "redis": 2}
        untimed = set(redis_server.client.keys("parallel_gen:result:*"))
        assert all(redis_server.client.ttl(k) == -1 for k in untimed)  # written by a cache without ttl
        pg.generate_parallel(smol, ["Hello"], pg.SamplingParams(max_tokens=2, temperature=0), cache=cache)
        (new,) = set(redis_server.client.keys("parallel_gen:result:*")) - untimed
        assert 0 < redis_server.client.ttl(new) <= 600
        redis_server.kill()
        caplog.set_level(logging.WARNING, "parallel_gen")
        for _ in range(3):  # uncached, answered, one warning
            out = pg.generate_parallel(smol, ["Once upon a time"], pg.SamplingParams(max_tokens=4, temperature=0),
                                       cache=cache)
            assert out[0].outputs[0].finish_reason == "length"
        assert cache.counts.errors >= 1
        assert sum("Redis at" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="ttl"):
        pg.ResultCache(redis_server.url, ttl=0)


def test_sequences_in_flight_are_leases_in_redis_that_a_dead_server_does_not_keep(redis_server):
    from parallel_gen.server.limits import Lease, RedisCounters, Refusal

    key = KeyTable.parse({"keys": [as_key("bob", max_concurrent=3)]}).keys[0]
    errors = []
    one, two, dead = (RedisCounters(redis_server.url, lambda: errors.append(1), lease_seconds=1.5) for _ in range(3))
    try:
        a = one.take_request(key, 2, time.time())
        assert isinstance(a, Lease)
        refused = two.take_request(key, 2, time.time())  # 2 + 2 > 3, whichever server asks
        assert isinstance(refused, Refusal) and refused.limit == "max_concurrent" and "(2 now)" in refused.message
        b = two.take_request(key, 1, time.time())
        assert isinstance(b, Lease)
        # Held for several lease lengths: the live servers renew theirs.
        time.sleep(4 * 1.5)
        assert isinstance(two.take_request(key, 1, time.time()), Refusal)
        a.release()
        a.release()  # a second call lets nothing else go
        one.flush()
        c = two.take_request(key, 2, time.time())
        assert isinstance(c, Lease)
        b.release(), c.release()
        two.flush()
        # A server that dies holds its sequences no longer than a lease.
        assert isinstance(dead.take_request(key, 3, time.time()), Lease)
        dead.close()  # stops renewing, releases nothing: what a killed process leaves
        assert isinstance(one.take_request(key, 1, time.time()), Refusal)
        assert _wait(lambda: isinstance(one.take_request(key, 3, time.time()), Lease), 10)
        assert not errors
    finally:
        one.close(), two.close()


def test_two_servers_share_results_and_limits_through_redis(smollm2_path, tmp_path, redis_server):
    path = keys_file(tmp_path / "keys.json", [as_key("alice", rpm=4), as_key("dave"), as_key("bob", max_concurrent=2)])
    args = ("--n-parallel", "2", "--api-keys", path, "--result-cache", redis_server.url)
    one = Server(smollm2_path, *args, key=None, names=())
    two = Server(smollm2_path, *args, key=None, names=())
    try:
        for s in (one, two):
            s.http = http(s, "dave")
        # Limits: alice's 4 requests a minute, wherever she sends them.
        with http(one, "alice") as a1, http(two, "alice") as a2:
            for c in (a1, a2, a1, a2):
                assert ask(c, temperature=1.0).status_code == 200  # not cacheable: each one runs
            _limited(ask(a1), "rpm")
            _limited(ask(a2), "rpm")
        # bob's 2 sequences in flight, wherever they run.
        with http(one, "bob") as b1, http(two, "bob") as b2:
            with b1.stream("POST", "/v1/completions", json={"prompt": ["Once", "Twice"], **LONG}) as r:
                lines = r.iter_lines()
                assert any(next(lines).startswith("data: ") for _ in range(4))
                assert "(2 now)" in _limited(ask(b2), "max_concurrent")["message"]
            # the stream closed: its sequences are let go on one, and two sees it
            assert _wait(lambda: ask(b2, prompt=["a", "b"]).status_code == 200)
        # Results: what one decoded, two answers without decoding.
        body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        with http(one, "dave") as d1, http(two, "dave") as d2:
            r1 = d1.post("/v1/completions", json=body).json()
            assert _wait(lambda: len(redis_server.client.keys("parallel_gen:result:*")) >= 1)
            decodes = two.metric("parallel_gen_engine_decode_calls")
            r2 = d2.post("/v1/completions", json=body).json()
            assert r2["choices"][0]["text"] == r1["choices"][0]["text"]
            for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
                assert r2["usage"][field] == r1["usage"][field]
            assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == r1["usage"]["prompt_tokens"]
            assert two.metric("parallel_gen_engine_decode_calls") == decodes  # no decode
            assert two.metric("parallel_gen_result_cache_calls_total", '{outcome="hit"}') == 1
            assert two.metric("parallel_gen_result_cache_hits", '{level="redis"}') == 1
            with d2.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                streamed = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            assert "".join(c["choices"][0]["text"] for c in streamed) == r1["choices"][0]["text"]
            assert two.metric("parallel_gen_result_cache_hits", '{level="memory"}') == 1
            # Redis killed: every request is still answered, uncached; counted, warned once.
            redis_server.kill()
            for i in range(3):
                r = d1.post("/v1/completions", json={**body, "prompt": f"Redis is gone {i}"})
                assert r.status_code == 200, r.text
            assert d2.post("/v1/completions", json=body).status_code == 200  # its memory level
            assert one.metric("parallel_gen_result_cache_redis_errors") >= 1
            assert one.metric("parallel_gen_limits_redis_errors_total") >= 1
        warned = [line for line in one.lines if "Redis at" in line and "failed" in line]
        assert len([w for w in warned if "result cache" in w]) == 1, warned
        assert len([w for w in warned if "rate limits" in w]) == 1, warned
    finally:
        one.stop()
        two.stop()


def test_weighted_turns_in_the_runner(smollm2_path):
    """The runner's turns by Share: with one slot, keys of weight 3 and 1 with work waiting
    get their sequences admitted 3 to 1, whoever sent more requests (counted in the order
    sequences finish: with one slot, the order they were admitted)."""
    from parallel_gen.core.client import Client
    from parallel_gen.core.events import RequestDone, SequenceFinished
    from parallel_gen.core.inputs import param_list, prepare_all, prompt_items
    from parallel_gen.core.runner import Share

    def items(m, n, max_tokens):
        texts = [f"Item {i}:" for i in range(n)]
        params = param_list(pg.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), {}, n)
        return [it for i, (p, s) in enumerate(zip(prepare_all(m, texts), params))
                for it in prompt_items(m, i, p, s)[0]]

    with pg.Model(smollm2_path, n_parallel=1, n_ctx=256, n_threads=2) as m, Client(m) as c:
        blocker = c.submit(items(m, 1, 60))  # holds the slot while the others queue up
        heavy = c.submit(items(m, 12, 2), share=Share("heavy", 3))
        light = [c.submit(items(m, 4, 2), share=Share("light", 1)) for _ in range(3)]  # more requests
        order, done = [], 0
        while done < 5:
            ev = c.next()
            if isinstance(ev.event, SequenceFinished) and ev.request is not blocker:
                order.append("heavy" if ev.request is heavy else "light")
            elif isinstance(ev.event, RequestDone):
                done += 1
    assert len(order) == 24
    assert order[:8].count("heavy") == 6, order  # 3 to 1 while both wait
    assert order[-6:].count("light") == 6, order  # light's rest, once heavy has none


def test_a_file_job_shares_results_through_redis(smol, smollm2_path, redis_server, tmp_path):
    """`parallel-gen generate --result-cache redis://...` stores its greedy rows in Redis; a
    job in another process with the same cache answers them from Redis with no decode."""
    prompts = [f"Fact {i}: the mountain" for i in range(4)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    r = subprocess.run([sys.executable, "-m", "parallel_gen", "generate", "-f", str(src), "-o",
                        str(tmp_path / "one.jsonl"), "--model", str(smollm2_path), "--max-tokens", "6",
                        "--temperature", "0", "--threads", "1", "--no-prompt-cache", "--result-cache",
                        redis_server.url], env={**os.environ, "PYTHONPATH": PYTHON_DIR}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before = smol.stats().tokens_generated
    with pg.ResultCache(redis_server.url) as cache:  # an empty in-process level: every hit is Redis's
        s = pg.run_file_job(smol, src, tmp_path / "two.jsonl", max_tokens=6, temperature=0, cache=cache)
        assert cache.counts.hits == {"memory": 0, "redis": 4}
    assert (s.written, s.failed) == (4, 0) and smol.stats().tokens_generated == before
    texts = lambda name: [json.loads(line)["text"] for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    assert texts("one.jsonl") == texts("two.jsonl")
