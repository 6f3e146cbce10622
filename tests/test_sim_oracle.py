"""The simulator's oracle router (`omni-ctl sim --oracle-port`), over real loopback HTTP.

Which instance served a request and what it had cached is read from the
simulator's own truth (`/sim/stats?requests=N`, matched by X-Request-Id).
"""

import asyncio
import concurrent.futures
import json
import random
import socket
import time
import urllib.error
import urllib.request

import pytest

from conftest import free_port, wait_until
from omni_ctl.sim.cluster import SimCluster, SimClusterError

pytestmark = pytest.mark.timeout(60)

# a larger KV cache than tiny's, so the queued work of the load test evicts nothing
ARGS = ["--hash-seed", "7", "--num-blocks", "16384"]


# -- helpers -----------------------------------------------------------------------------

def post(url, body, xrid=None, timeout=20.0):
    """(status, parsed JSON or raw SSE text, headers); error statuses are returned."""
    headers = {"Content-Type": "application/json"}
    if xrid:
        headers["X-Request-Id"] = xrid
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
            st, hdr = r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, st, hdr = e.read().decode(), e.code, dict(e.headers)
    if hdr.get("Content-Type", "").startswith("text/event-stream"):
        return st, raw, hdr
    return st, json.loads(raw), hdr


def get_json(url, timeout=10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def events(raw):
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    out = [e[len("data: "):] for e in raw.split("\n\n") if e]
    return [json.loads(e) for e in out[:-1]]


def oracle(sim, decisions=0):
    return get_json(f"{sim.oracle_url}/oracle/stats?decisions={decisions}")


def served(sim, xrid, kinds=("kv_producer", "bootstrap", "local")):
    """(instance name, cached_tokens) of the request's prefill (or only) leg."""
    hits = [(inst["name"], r["cached_tokens"])
            for inst in sim.stats(requests=300)["cluster"]
            for r in inst["requests"] if r["x_request_id"] == xrid and r["kind"] in kinds]
    assert len(hits) == 1, (xrid, hits)
    return hits[0]


def busy(sim, name):
    for inst in sim.stats()["cluster"]:
        if inst["name"] == name:
            return inst["waiting"] + inst["running"]
    raise KeyError(name)


def tokens(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(300, 8000) for _ in range(n)]


def completion(sim, prompt, xrid, **kw):
    body = {"prompt": prompt, "max_tokens": 3, "ignore_eos": True, **kw}
    st, data, hdr = post(sim.oracle_url + "/v1/completions", body, xrid=xrid)
    assert st == 200, data
    assert hdr["X-Request-Id"] == xrid
    return data


def check_done(sim):
    """Nothing left in transit, no traceback."""
    wait_until(lambda: not any(oracle(sim)["in_transit"].values()), timeout=5,
               what="the oracle's transit lists to empty")
    assert "Traceback" not in sim.stderr_text(), sim.stderr_text()


# -- fixtures --------------------------------------------------------------------------------

def _cluster(**kw):
    return SimCluster(preset="tiny", args=ARGS + ["--oracle-port", free_port()], **kw)


@pytest.fixture(scope="module")
def vo():
    """vLLM flavour, 2 prefill + 2 decode: sequential P/D."""
    with _cluster(prefill=2, decode=2) as sim:
        yield sim
    assert sim.returncode == 0


@pytest.fixture(scope="module")
def so():
    """SGLang flavour, 2 prefill + 2 decode: parallel P/D."""
    with _cluster(prefill=2, decode=2, engine="sglang") as sim:
        yield sim
    assert sim.returncode == 0


@pytest.fixture(scope="module")
def ao():
    """Aggregated: 2 instances of role both."""
    with _cluster(prefill=0, decode=0, both=2) as sim:
        yield sim
    assert sim.returncode == 0


# -- the client API in every mode ---------------------------------------------------------

def _api_roundtrip(sim, tag):
    u = sim.oracle_url
    st, data, _ = post(u + "/v1/completions", {"prompt": f"hello {tag}", "max_tokens": 4,
                                               "ignore_eos": True})
    assert st == 200 and data["object"] == "text_completion"
    assert data["usage"]["completion_tokens"] == 4
    assert data["choices"][0]["finish_reason"] == "length"

    st, raw, hdr = post(u + "/v1/completions", {
        "prompt": f"stream {tag}", "max_tokens": 5, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}, xrid=f"s-{tag}")
    assert st == 200 and hdr["X-Request-Id"] == f"s-{tag}"
    ev = events(raw)
    assert sum(1 for e in ev if e["choices"]) == 5
    assert ev[-1]["choices"] == [] and ev[-1]["usage"]["completion_tokens"] == 5

    chat = {"messages": [{"role": "user", "content": f"hi {tag}"}], "max_tokens": 3,
            "ignore_eos": True}
    st, data, _ = post(u + "/v1/chat/completions", chat)
    assert st == 200 and data["object"] == "chat.completion"
    assert data["usage"]["completion_tokens"] == 3
    st, raw, _ = post(u + "/v1/chat/completions", dict(chat, stream=True))
    ev = events(raw)
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert ev[-1]["choices"][0]["finish_reason"] == "length"

    assert get_json(u + "/v1/models")["data"][0]["id"] == "sim-model"
    with urllib.request.urlopen(u + "/health", timeout=5) as r:
        assert r.status == 200
    st, data, _ = post(u + "/v1/completions", {"max_tokens": 2})
    assert st == 400 and data["error"]["type"] == "invalid_request_error"


def test_sequential_api(vo):
    b = vo.base_port
    assert vo.line == (f"--prefill-endpoints 127.0.0.1:{b},127.0.0.1:{b + 1} "
                       f"--decode-endpoints 127.0.0.1:{b + 2},127.0.0.1:{b + 3}")
    assert vo.oracle_url == f"http://127.0.0.1:{vo.oracle_port}"
    assert "oracle router (sequential)" in vo.stderr_text()
    _api_roundtrip(vo, "seq")
    s = oracle(vo)
    assert s["mode"] == "sequential" and s["requests"] == 5 and s["errors"] == 1
    # every prefill leg on a prefill instance, every decode leg on a decode instance,
    # and identical idle instances take turns
    assert set(s["prefill"]) == {"prefill-0", "prefill-1"}
    assert set(s["decode"]) == {"decode-0", "decode-1"}
    kinds = {inst["name"]: {r["kind"] for r in inst["requests"]}
             for inst in vo.stats(requests=50)["cluster"]}
    assert kinds["prefill-0"] | kinds["prefill-1"] == {"kv_producer"}
    assert kinds["decode-0"] | kinds["decode-1"] == {"kv_consumer"}
    check_done(vo)


def test_sequential_finished_in_prefill(vo):
    # EOS on the first token: the prefill returns kv_transfer_params null and
    # its answer is the client's answer, streamed or not
    body = {"prompt": "one and done", "max_tokens": 8, "sim_eos_at": 1}
    st, data, _ = post(vo.oracle_url + "/v1/completions", body)
    assert st == 200 and data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 1
    st, raw, _ = post(vo.oracle_url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "stop"}], "max_tokens": 8, "sim_eos_at": 1,
        "stream": True, "stream_options": {"include_usage": True}})
    ev = events(raw)
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert ev[1]["choices"][0]["finish_reason"] == "stop"
    assert ev[-1]["usage"]["completion_tokens"] == 1
    check_done(vo)


def test_parallel_api(so):
    assert "@" in so.line and so.oracle_url
    _api_roundtrip(so, "par")
    # a batch of prompts gets lists of bootstrap fields
    st, data, _ = post(so.oracle_url + "/v1/completions",
                       {"prompt": ["one", "two", "three"], "max_tokens": 2})
    assert st == 200 and len(data["choices"]) == 3
    s = oracle(so)
    assert s["mode"] == "parallel" and s["requests"] == 6 and s["errors"] == 1
    kinds = {r["kind"] for inst in so.stats(requests=50)["cluster"] for r in inst["requests"]}
    assert kinds == {"bootstrap", "boot_decode"}
    check_done(so)


def test_parallel_failed_prefill_fails_fast(so):
    # the prefill leg fails before its room exists: the decode leg would wait for
    # the bootstrap timeout (30 s); the oracle cancels it and answers at once
    for name in ("prefill-0", "prefill-1"):
        so.fault(so.prefill_urls[0], mode="error", status=503, instance=name)
    try:
        for stream in (False, True):
            t0 = time.monotonic()
            st, data, _ = post(so.oracle_url + "/v1/completions",
                               {"prompt": "doomed", "max_tokens": 4, "stream": stream},
                               timeout=10)
            assert time.monotonic() - t0 < 3.0
            if st == 200:     # the decode stream had started: one error event, then the end
                assert stream and '"error"' in data and "[DONE]" not in data
            else:
                assert st == 503 and data["error"]["message"] == "simulated fault: error"
    finally:
        so.fault(so.prefill_urls[0], mode="none", instance="all")
    wait_until(lambda: all(i["waiting"] + i["running"] == 0
                           for i in so.stats()["cluster"]), timeout=5,
               what="the cancelled decode legs to leave")
    check_done(so)


@pytest.mark.parametrize("flavour", ["vo", "so", "ao"])
def test_client_abort_cancels_the_legs(flavour, request):
    sim = request.getfixturevalue(flavour)
    decoders = [i["name"] for i in sim.stats()["cluster"] if i["role"] != "prefill"]
    before = sum(i["aborted_total"] for i in sim.stats()["cluster"] if i["name"] in decoders)
    host, port = sim.oracle_url.split("//", 1)[1].split(":")
    data = json.dumps({"prompt": "a long answer", "max_tokens": 5000, "ignore_eos": True,
                       "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                  .encode() + data)
        got = b""
        while got.count(b"data: {") < 3:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    # the client is gone: the decode leg is aborted, nothing stays queued
    wait_until(lambda: all(i["waiting"] + i["running"] == 0 for i in sim.stats()["cluster"]),
               timeout=5, what="the engines to drop the aborted request")
    after = sum(i["aborted_total"] for i in sim.stats()["cluster"] if i["name"] in decoders)
    assert after == before + 1
    check_done(sim)


def test_aggregated_api(ao):
    assert ao.line.startswith("--decode-endpoints ") and "--prefill" not in ao.line
    _api_roundtrip(ao, "agg")
    s = oracle(ao)
    assert s["mode"] == "plain" and s["decode"] == {}
    assert set(s["prefill"]) == {"both-0", "both-1"}
    check_done(ao)


def test_upstream_failure_mid_stream(ao):
    # an instance that drops the connection mid-stream: the client gets the
    # tokens so far, then one error event, and the stream ends
    ao.fault(ao.decode_urls[0], mode="drop", after_tokens=2, instance="all")
    try:
        st, raw, _ = post(ao.oracle_url + "/v1/completions",
                          {"prompt": "cut short", "max_tokens": 8, "stream": True})
    finally:
        ao.fault(ao.decode_urls[0], mode="none", instance="all")
    assert st == 200 and "[DONE]" not in raw
    ev = [json.loads(e[len("data: "):]) for e in raw.split("\n\n") if e]
    assert len([e for e in ev if "choices" in e]) == 2 and "error" in ev[-1]
    check_done(ao)


def test_bad_oracle_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SimClusterError, match="--oracle-port"):
            SimCluster(prefill=1, decode=1, preset="tiny",
                       args=["--oracle-port", port], ready_timeout=30).start()


# -- how it decides ---------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["vo", "so", "ao"])
def test_prefix_goes_to_its_holder(flavour, request):
    sim = request.getfixturevalue(flavour)
    prefix = tokens(3000, seed={"vo": 1, "so": 2, "ao": 3}[flavour])
    first = f"aff-{flavour}-0"
    completion(sim, prefix + tokens(40, 1), first)
    holder, cached = served(sim, first)
    assert cached == 0
    for i in range(1, 5):
        xrid = f"aff-{flavour}-{i}"
        completion(sim, prefix + tokens(40, 100 + i), xrid)
        name, cached = served(sim, xrid)
        assert name == holder and cached == 2992        # 187 full blocks of the prefix
        last = oracle(sim, decisions=1)["recent"][-1]
        assert last["x_request_id"] == xrid and last["reason"] == "cache"
        assert last["hit_tokens"] == cached             # the oracle saw the engine's truth
    check_done(sim)


def test_load_beats_cache_when_the_holder_is_busy(vo):
    prefix = tokens(3000, seed=11)
    completion(vo, prefix + tokens(40, 12), "busy-0")
    holder, _ = served(vo, "busy-0")
    other = "prefill-1" if holder == "prefill-0" else "prefill-0"
    url = vo.prefill_urls[int(holder[-1])]
    vo.fault(url, mode="slow", factor=2)
    try:
        # slower, but the hit still wins: recomputing 3000 tokens costs more
        completion(vo, prefix + tokens(40, 13), "busy-1")
        assert served(vo, "busy-1") == (holder, 2992)

        # queue about 0.8 s of work on the holder, straight to it (not through the oracle)
        vo.fault(url, mode="slow", factor=5)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            jobs = [pool.submit(post, url + "/v1/completions",
                                {"prompt": tokens(4000, 500 + i), "max_tokens": 1}, None, 20.0)
                    for i in range(16)]
            wait_until(lambda: busy(vo, holder) >= 6, timeout=5, what="the holder's queue")
            completion(vo, prefix + tokens(40, 14), "busy-2")
            assert served(vo, "busy-2") == (other, 0)
            last = oracle(vo, decisions=1)["recent"][-1]
            assert last["reason"] == "load"
            assert last["candidates"][holder]["hit_tokens"] == 2992
            assert (last["candidates"][holder]["ttft_s"]
                    > 5 * last["candidates"][other]["ttft_s"])
            assert all(j.result()[0] == 200 for j in jobs)
        # drained: back to the holder... which is now one of two holders
        completion(vo, prefix + tokens(40, 15), "busy-3")
        assert served(vo, "busy-3")[1] == 2992
    finally:
        vo.fault(url, mode="none")
    assert oracle(vo)["decisions"]["load"] >= 1
    check_done(vo)


def test_flushed_holder_is_no_longer_preferred(vo):
    prefix = tokens(3000, seed=21)
    completion(vo, prefix + tokens(40, 22), "flush-0")
    holder, _ = served(vo, "flush-0")
    other = "prefill-1" if holder == "prefill-0" else "prefill-0"
    url = vo.prefill_urls[int(holder[-1])]
    vo.fault(url, mode="slow", factor=2)          # without its cache, the holder is worse
    try:
        completion(vo, prefix + tokens(40, 23), "flush-1")
        assert served(vo, "flush-1") == (holder, 2992)
        st, _, _ = post(url + "/flush_cache", {})
        assert st == 200
        completion(vo, prefix + tokens(40, 24), "flush-2")
        assert served(vo, "flush-2") == (other, 0)
        last = oracle(vo, decisions=1)["recent"][-1]
        assert last["candidates"][holder]["hit_tokens"] == 0
        # and the new holder keeps it
        completion(vo, prefix + tokens(40, 25), "flush-3")
        assert served(vo, "flush-3") == (other, 2992)
    finally:
        vo.fault(url, mode="none")
    check_done(vo)


async def _burst(url, bodies):
    """Send every request at once on its own pre-opened connection (so the
    oracle decides them all before any leg reaches an engine); statuses."""
    host, port = url.split("//", 1)[1].split(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in bodies]
    for (_, w), (xrid, body) in zip(conns, bodies):
        data = json.dumps(body).encode()
        w.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nX-Request-Id: {xrid}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                f"Connection: close\r\n\r\n".encode() + data)
    out = []
    for r, w in conns:
        raw = await asyncio.wait_for(r.read(), 20)
        out.append(int(raw.split(b" ", 2)[1]))
        w.close()
    return out


def test_burst_is_spread(vo):
    # distinct prompts sent at once to a slightly slower and a faster instance:
    # legs still on the wire count as queued work where they go, so the burst
    # is shared instead of all landing on the faster one
    vo.fault(vo.prefill_urls[0], mode="slow", factor=1.5)
    try:
        before = dict(oracle(vo)["prefill"])
        bodies = [(f"burst-{i}", {"prompt": tokens(4000, 900 + i), "max_tokens": 2})
                  for i in range(16)]
        assert asyncio.run(_burst(vo.oracle_url, bodies)) == [200] * 16
    finally:
        vo.fault(vo.prefill_urls[0], mode="none")
    after = oracle(vo)["prefill"]
    got = {k: after.get(k, 0) - before.get(k, 0) for k in ("prefill-0", "prefill-1")}
    assert sum(got.values()) == 16 and got["prefill-0"] >= 4 and got["prefill-1"] >= 8, got
    check_done(vo)
