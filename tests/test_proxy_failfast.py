"""Parallel P/D fails fast: one leg failing cancels the other at once.

A real nginx with our module in front of the simulated cluster (1 prefill +
1 decode, SGLang protocol, parallel P/D).  The prefill instance hangs (it
would keep the client until the 600 s read timeout); the decode instance
dies or answers 500: the prefill leg is cancelled, the client gets one
well-formed error within a second or so (the assertion allows more on a
loaded machine), the cancel is counted as a cancel and logged at info
level, not as an upstream timeout.
"""

import time

import pytest

from omni_ctl.sim.cluster import SimCluster
from test_proxy_errors import _error, _idle

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sim():
    with SimCluster(prefill=1, decode=1, engine="sglang", preset="tiny",
                    args=["--speedup", "0.2"]) as cluster:
        yield cluster


@pytest.fixture
def hung_prefill(sim):
    sim.fault(sim.prefill_urls[0], mode="hang")
    yield sim
    sim.fault(sim.prefill_urls[0], mode="none", instance="all")


@pytest.mark.parametrize("decode_fault", [dict(mode="error", status=500),
                                          dict(mode="drop", after_tokens=0)])
def test_decode_failing_cancels_the_hung_prefill(omni_nginx, hung_prefill, decode_fault):
    sim = hung_prefill
    nginx = omni_nginx(pd_policy="parallel", schedule_policy="least-loaded",
                       prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=",".join(sim.decode_endpoints),
                       max_retries=0, log_level="info")
    sim.fault(sim.decode_urls[0], **decode_fault)
    before = nginx.status()["totals"]["legs_cancelled"]
    started = time.monotonic()
    resp = nginx.post("/v1/completions", json={"prompt": "fail fast", "max_tokens": 2},
                      timeout=60)
    took = time.monotonic() - started
    err = _error(resp, 502, "server_error")
    assert "decode" in err["message"]
    # the real bound is the mechanism (the prefill would hang for 600 s);
    # a generous deadline for a loaded machine
    assert took < 5, took
    status = _idle(nginx)
    assert status["totals"]["legs_cancelled"] == before + 1
    metrics = nginx.get("/metrics").text
    assert f"omni_legs_cancelled_total {before + 1}" in metrics
    log = nginx.error_log
    assert "cancelling the prefill leg" in log
    assert "upstream timed out" not in log
