"""A request's deadline (--request-timeout, lowered per request with
X-Omni-Request-Timeout: <ms>) covers the queue and both legs: past it the
client gets 504, or one SSE error event when its stream had started, and the
legs are cancelled.

A real nginx with our module in front of the simulated cluster (1 prefill +
1 decode, vLLM protocol, sequential P/D); the simulator hangs or stalls an
instance with its fault injection.  The per-leg read timeouts stay at 600 s:
only the deadline can end these requests in time.
"""

import http.client
import json
import time

import pytest

from omni_ctl.sim.cluster import SimCluster
from test_proxy_errors import _error, _idle

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sim():
    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny",
                    args=["--speedup", "0.2"]) as cluster:
        yield cluster


@pytest.fixture
def clean_sim(sim):
    yield sim
    sim.fault(sim.urls[0], mode="none", instance="all")


def _proxy(omni_nginx, sim, **options):
    return omni_nginx(prefill_endpoints=",".join(sim.prefill_endpoints),
                      decode_endpoints=",".join(sim.decode_endpoints),
                      schedule_policy="least-loaded", max_retries=0, **options)


@pytest.mark.parametrize("tier", ["prefill", "decode"])
def test_request_timeout_answers_504_at_the_deadline(omni_nginx, clean_sim, tier):
    nginx = _proxy(omni_nginx, clean_sim, request_timeout="1500ms")
    assert nginx.status()["config"]["request_timeout_ms"] == 1500
    url = (clean_sim.prefill_urls if tier == "prefill" else clean_sim.decode_urls)[0]
    clean_sim.fault(url, mode="hang")
    started = time.monotonic()
    resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    took = time.monotonic() - started
    err = _error(resp, 504, "server_error")
    assert "deadline of 1500 ms" in err["message"]
    assert 1.4 < took < 10, took
    _idle(nginx)


def test_header_lowers_the_deadline_never_raises_it(omni_nginx, clean_sim):
    nginx = _proxy(omni_nginx, clean_sim, request_timeout="3s")
    clean_sim.fault(clean_sim.decode_urls[0], mode="hang")
    resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                      headers={"X-Omni-Request-Timeout": "700"}, timeout=60)
    assert "deadline of 700 ms" in _error(resp, 504)["message"]
    resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                      headers={"X-Omni-Request-Timeout": "60000"}, timeout=60)
    assert "deadline of 3000 ms" in _error(resp, 504)["message"]
    _idle(nginx)


def _post_with_headers(nginx, headers):
    """POST a small completion with `headers` as (name, value) pairs, so a
    name may repeat; returns (status, parsed JSON body)."""
    conn = http.client.HTTPConnection(nginx.host, nginx.port, timeout=60)
    try:
        body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_repeated_deadline_headers_the_least_wins_and_a_bad_one_is_400(
        omni_nginx, clean_sim):
    """All of a request's headers are read in one walk with the SLO and
    X-Request-Id headers: a repeated X-Omni-Request-Timeout still counts
    every time, whatever the order and the other headers around it."""
    nginx = _proxy(omni_nginx, clean_sim, request_timeout="3s")
    clean_sim.fault(clean_sim.decode_urls[0], mode="hang")
    status, body = _post_with_headers(nginx, [
        ("X-Omni-Request-Timeout", "60000"), ("X-Request-Id", "r-1"),
        ("X-Omni-SLO-TPOT", "50"), ("x-omni-request-timeout", "800")])
    assert status == 504 and "deadline of 800 ms" in body["error"]["message"]
    status, body = _post_with_headers(nginx, [
        ("X-Omni-Request-Timeout", "800"), ("X-Omni-SLO-TTFT", "900"),
        ("X-Omni-Request-Timeout", "soon")])
    assert status == 400
    assert "X-Omni-Request-Timeout" in body["error"]["message"]
    _idle(nginx)


@pytest.mark.parametrize("value", ["0", "-5", "soon", "99999999999"])
def test_bad_deadline_header_is_400(omni_nginx, clean_sim, value):
    nginx = _proxy(omni_nginx, clean_sim)
    resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                      headers={"X-Omni-Request-Timeout": value})
    assert "X-Omni-Request-Timeout" in _error(resp, 400)["message"]
    _idle(nginx)


def test_deadline_in_a_started_stream_is_one_sse_error(omni_nginx, clean_sim):
    nginx = _proxy(omni_nginx, clean_sim)
    clean_sim.fault(clean_sim.decode_urls[0], mode="stall", after_tokens=2)
    conn = http.client.HTTPConnection(nginx.host, nginx.port, timeout=60)
    conn.request("POST", "/v1/completions",
                 body=json.dumps({"prompt": "x", "max_tokens": 50, "ignore_eos": True,
                                  "stream": True}),
                 headers={"Content-Type": "application/json",
                          "X-Omni-Request-Timeout": "1500"})
    resp = conn.getresponse()
    assert resp.status == 200
    data = resp.read()          # to the end: the deadline must end it
    conn.close()
    events = [e for e in data.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events), data
    assert len(events) >= 2 and b"[DONE]" not in data
    last = json.loads(events[-1][6:])
    assert last["error"]["code"] == 504 and last["error"]["type"] == "server_error"
    _idle(nginx)
