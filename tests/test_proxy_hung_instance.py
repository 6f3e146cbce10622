"""A prefill instance that hangs with a request in flight does not hold the
requests that would prefer it (their prefix is cached there) until that
request's deadline: its predicted free moment moves away as the work
overruns its prediction (omni_predict_wait_us), so they go to the other
instance once recomputing there costs less than waiting.

Real nginx with the module in front of `omni-ctl sim` (2 prefill, 1 decode,
vLLM protocol); the hang is the simulator's fault mode (accepts, never
answers)."""

import json
import threading
import time
import urllib.request

import pytest

from omni_ctl.sim.cluster import SimCluster
from conftest import random_tokens as _tokens

pytestmark = pytest.mark.timeout(180)

BLOCK = 16


def _post_url(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status


def _prefill_of(nginx, before):
    after = {i["address"]: i["requests_total"]
             for i in nginx.status()["instances"] if i["role"] == "prefill"}
    went = [a for a in after if after[a] != before.get(a)]
    return went, after


def test_requests_leave_a_hung_instance_they_would_prefer(omni_nginx):
    with SimCluster(prefill=2, decode=1, engine="vllm", preset="tiny") as sim:
        nginx = omni_nginx(prefill_endpoints=",".join(sim.prefill_endpoints),
                           decode_endpoints=",".join(sim.decode_endpoints),
                           pd_policy="sequential", block_size=BLOCK,
                           request_timeout="30s")
        addrs = [e.split("@", 1)[0] for e in sim.prefill_endpoints]
        urls = dict(zip(addrs, sim.prefill_urls))
        shared = _tokens(BLOCK * 96, "shared")

        def send(tail, timeout=90):
            body = {"model": "m", "prompt": shared + _tokens(BLOCK, tail),
                    "max_tokens": 2}
            return nginx.post("/v1/completions", json=body, timeout=timeout)

        before = {}
        _, before = _prefill_of(nginx, before)
        assert send("warm").status == 200
        went, before = _prefill_of(nginx, before)
        assert len(went) == 1
        hung = went[0]
        assert _post_url(urls[hung], "/sim/fault", {"mode": "hang"}) == 200

        # the first request after the hang prefers the instance that has the
        # prefix, and hangs there until its deadline
        stuck = {}
        t = threading.Thread(target=lambda: stuck.update(r=send("stuck")))
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = {i["address"]: i for i in nginx.status()["instances"]}
            if st[hung]["inflight_requests"] >= 1:
                break
            time.sleep(0.05)
        assert st[hung]["inflight_requests"] >= 1, "the first request never went"

        # as the work overruns its prediction, the instance's predicted free
        # moment moves away (it stayed "free in min_us" before: never true)
        def free_in_ms():
            st = {i["address"]: i for i in nginx.status()["instances"]}
            return st[hung]["predictor"]["predicted_free_in_ms"]
        deadline = time.monotonic() + 20
        while free_in_ms() < 1000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert free_in_ms() >= 1000, "a hung instance still looks nearly free"

        # the next ones with the same prefix do not wait for it: they are
        # answered by the other instance long before the first one's 30 s
        # deadline
        t0 = time.monotonic()
        for k in range(3):
            resp = send(f"next-{k}", timeout=50)
            assert resp.status == 200, resp.text
            went, before = _prefill_of(nginx, before)
            assert went and went != [hung], went
        print(f"three answered in {time.monotonic() - t0:.2f}s "
              f"while {hung} hangs")
        assert stuck == {}                      # still waiting on the hang
        assert _post_url(urls[hung], "/sim/fault", {"mode": "none"}) == 200
        t.join(timeout=90)
        assert stuck["r"].status in (200, 502, 504), stuck["r"].text
        nginx.allow("timed out|deadline|request timeout")
