"""The decode step model learns from streamed answers without taking the
zone lock for every event (issue 23: "per-chunk work on the decode stream
must not take a lock shared by all workers").

A real nginx with our module (2 workers) in front of the simulator (tiny
preset slowed to ~10 ms decode steps, so each token's event reaches the
proxy in its own read). Each event after a stream's first is one step
sample for the predictor; the samples wait in their worker and go to the
shared zone together, and `scheduler.decode_step_flushes` counts the times
the zone lock was taken for them.
"""

import json
import threading
import urllib.request

import pytest

from conftest import wait_until
from omni_ctl.sim.cluster import SimCluster

pytestmark = pytest.mark.timeout(120)

STREAMS = 16
TOKENS = 40


def _decode_samples(status):
    return sum(i["predictor"]["decode_samples"] for i in status["instances"]
               if i["role"] == "decode")


def _stream(url, i, events, errors):
    body = {"model": "m", "prompt": f"stream {i} " + "x " * 40, "max_tokens": TOKENS,
            "ignore_eos": True, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            n, buf = 0, b""
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                buf += chunk
                n += buf.count(b"\n\n")
                buf = buf.rsplit(b"\n\n", 1)[-1]
            events[i] = n
    except Exception as exc:        # reported by the test, not lost in a thread
        errors.append(repr(exc))


def test_streamed_decode_steps_reach_the_predictor_in_batches(omni_nginx):
    with SimCluster(prefill=1, decode=2, engine="vllm", preset="tiny",
                    args=["--speedup", "0.2"]) as sim:
        nginx = omni_nginx(pd_policy="sequential",
                           prefill_endpoints=",".join(sim.prefill_endpoints),
                           decode_endpoints=",".join(sim.decode_endpoints))
        before = nginx.status()
        samples0 = _decode_samples(before)
        flushes0 = before["scheduler"]["decode_step_flushes"]

        events, errors = {}, []
        threads = [threading.Thread(target=_stream, args=(nginx.url, i, events, errors))
                   for i in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert not errors, errors
        # TOKENS token events, the usage-less [DONE]: every stream whole
        assert sorted(events.values()) == [TOKENS + 1] * STREAMS, events

        # the last samples go in by the worker's timer, not by a next event
        def settled():
            st = nginx.status()
            return st if _decode_samples(st) - samples0 >= STREAMS * TOKENS // 2 else None
        after = wait_until(settled, timeout=10, what="decode step samples in the predictor")
        samples = _decode_samples(after) - samples0
        flushes = after["scheduler"]["decode_step_flushes"] - flushes0

        # one sample per gap between two reads that passed events: most of
        # the TOKENS - 1 gaps of each stream
        assert STREAMS * TOKENS // 2 <= samples <= STREAMS * TOKENS, samples
        # the lock was taken for batches of samples, not for each (on the
        # module before, there was one lock per sample and no counter)
        assert 1 <= flushes and flushes * 3 <= samples, (flushes, samples)
        # and the decode step model learned from them
        coef = [i["predictor"]["decode_coef"] for i in after["instances"]
                if i["role"] == "decode"]
        assert any(sum(c) > 0 for c in coef), coef
