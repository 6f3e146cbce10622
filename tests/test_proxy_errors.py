"""Every failure gets one well-formed answer, never a hang, and leaves no
load behind.

A real nginx with our module in front of the simulated cluster (1 prefill +
1 decode, vLLM protocol, sequential P/D); the simulator's fault injection
(`POST /sim/fault`) makes the instances misbehave.  Each case asserts the
status, the shape of the body (OpenAI-style JSON error, or one SSE error
event after the stream started), that error.log has no [alert]/[emerg]
(the omni_nginx fixture checks it) and that /omni/status shows nothing in
flight afterwards.
"""

import http.client
import json
import socket
import time

import pytest

from omni_ctl.sim.cluster import SimCluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sim():
    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny",
                    args=["--speedup", "0.2"]) as cluster:
        yield cluster


@pytest.fixture(params=["omni", "least-loaded"])
def clean_sim(sim, request):
    """The cluster, reset after the test; the param is the scheduling
    policy _proxy() uses (with and without holding)."""
    sim.policy = request.param
    yield sim
    # through one instance for all: an exited instance cannot be asked itself
    for url in sim.urls:
        try:
            sim.fault(url, mode="none", instance="all")
            break
        except OSError:
            continue


def _proxy(omni_nginx, sim, **options):
    options.setdefault("prefill_endpoints", ",".join(sim.prefill_endpoints))
    options.setdefault("decode_endpoints", ",".join(sim.decode_endpoints))
    options.setdefault("schedule_policy", sim.policy)
    return omni_nginx(**options)


def _idle(nginx, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        status = nginx.status()
        busy = [i for i in status["instances"]
                if i["inflight_requests"] or i["inflight_tokens"]]
        if not busy and status["totals"]["inflight_requests"] == 0:
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"load left behind: {busy} {status['totals']}")
        time.sleep(0.05)


def _error(resp, status, kind=None):
    assert resp.status == status, (resp.status, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] == status
    if kind:
        assert err["type"] == kind
    return err


BAD_REQUESTS = [
    # (path, raw body, what the message must mention)
    ("/v1/completions", b'{"prompt": "x",', "not valid JSON"),
    ("/v1/completions", b'["prompt"]', "JSON object"),
    ("/v1/completions", b'{"max_tokens": 3}', "'prompt' is required"),
    ("/v1/chat/completions", b'{"model": "m"}', "'messages' is required"),
    ("/v1/chat/completions", b'{"messages": "hi"}', "'messages'"),
    ("/v1/completions", b'{"prompt": 42}', "'prompt' must be"),
    ("/v1/completions", b'{"prompt": []}', "must not be empty"),
    ("/v1/completions", b'{"prompt": [1, -5, 3]}', "token ids"),
    ("/v1/completions", b'{"prompt": [1, 2.5]}', "token ids"),
    ("/v1/completions", b'{"prompt": ["a", [1, 2]]}', "'prompt' must be"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', "'stream'"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', "'max_tokens'"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "5"}', "'max_tokens'"),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', "not valid JSON"),
    ("/v1/completions", b'', "empty"),
]


def test_bad_requests_are_400(omni_nginx, clean_sim):
    nginx = _proxy(omni_nginx, clean_sim)
    before = clean_sim.stats()["cluster"]
    for path, body, mention in BAD_REQUESTS:
        resp = nginx.request("POST", path, body=body,
                             headers={"Content-Type": "application/json"})
        err = _error(resp, 400, "invalid_request_error")
        assert mention in err["message"], (body, err)
        assert resp.headers.get("x-omni-request-id")
    # none of them reached an engine
    after = clean_sim.stats()["cluster"]
    assert [i["requests_total"] for i in after] == [i["requests_total"] for i in before]
    _idle(nginx)


def test_nested_keys_are_never_rewritten(omni_nginx, clean_sim):
    """Keys the proxy edits ("stream", "max_tokens", "kv_transfer_params")
    inside nested values or strings reach the engines untouched."""
    nginx = _proxy(omni_nginx, clean_sim)
    body = {"prompt": 'say "stream": true, "max_tokens": 1', "max_tokens": 4,
            "ignore_eos": True, "metadata": {"stream": True, "max_tokens": 99,
                                             "kv_transfer_params": {"x": 1}}}
    resp = nginx.post("/v1/completions", json=body)
    assert resp.status == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4
    _idle(nginx)


def test_wrong_method_and_body_too_large(omni_nginx, clean_sim):
    nginx = _proxy(omni_nginx, clean_sim, max_body_size="1k")
    _error(nginx.get("/v1/completions"), 405)
    big = json.dumps({"prompt": "x" * 4096}).encode()
    _error(nginx.request("POST", "/v1/completions", body=big,
                         headers={"Content-Type": "application/json"}), 413)
    _idle(nginx)


def test_prefill_4xx_is_passed_on(omni_nginx, clean_sim):
    nginx = _proxy(omni_nginx, clean_sim)
    clean_sim.fault(clean_sim.prefill_urls[0], mode="error", status=400)
    resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert resp.status == 400, resp.text
    assert "error" in resp.json()
    _idle(nginx)


@pytest.mark.parametrize("tier", ["prefill", "decode"])
@pytest.mark.parametrize("stream", [False, True])
def test_5xx_becomes_502(omni_nginx, clean_sim, tier, stream):
    nginx = _proxy(omni_nginx, clean_sim)
    url = (clean_sim.prefill_urls if tier == "prefill" else clean_sim.decode_urls)[0]
    clean_sim.fault(url, mode="error", status=500)
    resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                               "stream": stream})
    err = _error(resp, 502, "server_error")
    assert tier in err["message"]
    _idle(nginx)


@pytest.mark.parametrize("tier", ["prefill", "decode"])
def test_connection_dropped_before_answer_is_502(omni_nginx, clean_sim, tier):
    nginx = _proxy(omni_nginx, clean_sim)
    url = (clean_sim.prefill_urls if tier == "prefill" else clean_sim.decode_urls)[0]
    clean_sim.fault(url, mode="drop", after_tokens=0)
    err = _error(nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}),
                 502, "server_error")
    assert tier in err["message"]
    _idle(nginx)


@pytest.mark.parametrize("tier", ["prefill", "decode"])
def test_timeouts_are_504(omni_nginx, clean_sim, tier):
    nginx = _proxy(omni_nginx, clean_sim, prefill_read_timeout="2s",
                   decode_read_timeout="2s")
    url = (clean_sim.prefill_urls if tier == "prefill" else clean_sim.decode_urls)[0]
    clean_sim.fault(url, mode="hang")
    started = time.monotonic()
    err = _error(nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                            timeout=30), 504, "server_error")
    assert tier in err["message"]
    assert time.monotonic() - started < 15
    _idle(nginx)


def _stream_events(nginx, body, timeout=30):
    conn = http.client.HTTPConnection(nginx.host, nginx.port, timeout=timeout)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    data = resp.read()      # to the end: the stream must end by itself
    conn.close()
    events = [e for e in data.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events), data
    return [e[6:] for e in events]


@pytest.mark.parametrize("mode", ["drop", "stall"])
def test_decode_failing_mid_stream_sends_one_error_event(omni_nginx, clean_sim, mode):
    nginx = _proxy(omni_nginx, clean_sim, decode_read_timeout="2s")
    clean_sim.fault(clean_sim.decode_urls[0], mode=mode, after_tokens=3)
    started = time.monotonic()
    events = _stream_events(nginx, {"prompt": "x", "max_tokens": 20,
                                    "ignore_eos": True, "stream": True})
    assert time.monotonic() - started < 15
    tokens = [json.loads(e) for e in events[:-1]]
    assert len(tokens) >= 1 and all("choices" in t for t in tokens)
    last = json.loads(events[-1])
    assert last["error"]["code"] == 502 and last["error"]["type"] == "server_error"
    assert b"[DONE]" not in events
    _idle(nginx)


def test_decode_instance_killed_mid_stream(omni_nginx, clean_sim):
    """The decode instance dies while streaming: the client gets the error
    event at once (well within the read timeout), not a hang."""
    nginx = _proxy(omni_nginx, clean_sim, decode_read_timeout="30s")
    conn = http.client.HTTPConnection(nginx.host, nginx.port, timeout=60)
    conn.request("POST", "/v1/completions",
                 body=json.dumps({"prompt": "x", "max_tokens": 200, "ignore_eos": True,
                                  "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.read1(65536)
    assert first.startswith(b"data: ")
    killed = time.monotonic()
    clean_sim.fault(clean_sim.decode_urls[0], mode="exit")
    rest = resp.read()
    conn.close()
    assert time.monotonic() - killed < 10
    last = [e for e in (first + rest).split(b"\n\n") if e][-1]
    # ours (502), or the engine's own error event when it could still say
    # goodbye: either way one error event ends the stream
    assert json.loads(last[6:])["error"]["code"] in (500, 502), last
    _idle(nginx)


def test_no_usable_instance_is_503_with_retry_after(omni_nginx, clean_sim):
    # a decode endpoint nobody listens on, taken out after one failure
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    nginx = _proxy(omni_nginx, clean_sim, decode_endpoints=f"127.0.0.1:{port}",
                   max_fails=1, fail_timeout="30s")
    err = _error(nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}),
                 502, "server_error")
    assert "decode" in err["message"]
    resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    _error(resp, 503, "server_error")
    assert resp.headers.get("retry-after") == "1"
    health = nginx.get("/health")
    assert health.status == 503 and health.json()["decode"]["usable"] == 0
    nginx.allow(r"connect\(\) failed")
    _idle(nginx)


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_client_disconnect_aborts_legs_and_releases_load(omni_nginx, clean_sim, stage):
    nginx = _proxy(omni_nginx, clean_sim)
    if stage == "prefill":
        clean_sim.fault(clean_sim.prefill_urls[0], mode="hang")
    sock = socket.create_connection((nginx.host, nginx.port))
    body = json.dumps({"prompt": "x", "max_tokens": 500, "ignore_eos": True,
                       "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    if stage == "decode":
        assert sock.recv(65536)          # the stream has started
    else:
        deadline = time.monotonic() + 10
        while not any(i["role"] == "prefill" and i["inflight_requests"]
                      for i in nginx.status()["instances"]):
            assert time.monotonic() < deadline, "the prefill leg never started"
            time.sleep(0.05)
    sock.close()
    status = _idle(nginx)
    assert status["totals"]["inflight_requests"] == 0
    if stage == "decode":
        # the engine saw the abort: its request is no longer running
        deadline = time.monotonic() + 10
        while any(i["running"] for i in clean_sim.stats()["cluster"]):
            assert time.monotonic() < deadline, clean_sim.stats()["cluster"]
            time.sleep(0.05)
