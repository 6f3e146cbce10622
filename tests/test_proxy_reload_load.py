"""`nginx -s reload` in the middle of a burst of streaming requests, some in
flight and some held: every client gets one complete answer or one
well-formed error, and the shared counters come back to zero.

Real nginx + the simulator (1 prefill + 1 decode, vLLM protocol, sequential
P/D); the prefill instance is made slow so that requests are held
(omni_prefill_max_num_seqs 1) when the reload comes.
"""

import http.client
import json
import threading
import time

import pytest

from omni_ctl.sim.cluster import SimCluster
from test_proxy_reload import _idle, _wait_new_workers

pytestmark = pytest.mark.timeout(180)

N = 8


@pytest.fixture(scope="module")
def sim():
    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny",
                    args=["--speedup", "0.2"]) as cluster:
        yield cluster


def _stream(nginx, k, results):
    try:
        conn = http.client.HTTPConnection(nginx.host, nginx.port, timeout=90)
        conn.request("POST", "/v1/completions",
                     body=json.dumps({"prompt": f"reload under load {k} " * 10,
                                      "max_tokens": 6, "ignore_eos": True,
                                      "stream": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        results[k] = (resp.status, resp.getheader("Content-Type"), resp.read())
        conn.close()
    except OSError as exc:
        results[k] = (None, None, repr(exc).encode())


def _well_formed(status, ctype, body):
    """One complete stream, one SSE stream ended by one error event, or one
    JSON error."""
    if status == 200:
        events = [e for e in body.split(b"\n\n") if e]
        assert events and all(e.startswith(b"data: ") for e in events), body[:300]
        if events[-1] == b"data: [DONE]":
            assert all("choices" in json.loads(e[6:]) for e in events[:-1])
            return "ok"
        assert json.loads(events[-1][6:])["error"]["code"] >= 500, events[-1]
        assert b"[DONE]" not in body
        return "error"
    assert status and status >= 400, (status, body[:300])
    assert ctype.startswith("application/json"), ctype
    assert json.loads(body)["error"]["code"] == status
    return "error"


def test_reload_under_streaming_load_loses_nothing(omni_nginx, sim):
    nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                       decode_endpoints=sim.decode_endpoints[0],
                       schedule_policy="omni", prefill_max_num_seqs=1,
                       prefill_read_timeout="60s")
    sim.fault(sim.prefill_urls[0], mode="slow", factor=200)
    results = {}
    threads = [threading.Thread(target=_stream, args=(nginx, k, results))
               for k in range(N)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while nginx.status()["queues"]["prefill_waiting"] < 2:
            assert time.monotonic() < deadline, nginx.status()["queues"]
            time.sleep(0.05)
        old = nginx.workers
        nginx.reload(queue_timeout="120s")
        _wait_new_workers(nginx, old, timeout=60)
    finally:
        sim.fault(sim.prefill_urls[0], mode="none", instance="all")
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert sorted(results) == list(range(N))
    kinds = [_well_formed(*results[k]) for k in range(N)]
    assert kinds.count("ok") >= 1, kinds
    st = _idle(nginx, timeout=30)
    assert st["totals"]["inflight_requests"] == 0
    assert all(i["inflight_requests"] == 0 and i["inflight_tokens"] == 0
               for i in st["instances"])
