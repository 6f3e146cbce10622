"""Held requests are decided once per change, not once per release pass
(issue 23: 22-37 policy decisions per request at 200 KB in bench-overhead).

A held request's decision depends on the instances' load, health and
predicted work and on the queue's head; an arrival behind it changes none of
that.  So while one prefill instance is full (omni_prefill_max_num_seqs 1,
its one request kept at the simulator's hanging engine), a burst of arrivals
must not make the scheduler decide again about the request at the head of
the queue: on the build before this change every arrival's pass re-ran the
policy for the head (the head of N arrivals was decided N times).  Asserted
through the counters /omni/status and /metrics export: the most decisions
any one held request had (`held_decisions_max`), and the decisions made
during the burst.
"""


import pytest

from conftest import send_kept, wait_until
from omni_ctl.sim.cluster import SimCluster

pytestmark = pytest.mark.timeout(180)

BURST = 24


@pytest.fixture(scope="module")
def cluster():
    with SimCluster(prefill=1, decode=1, engine="sglang", preset="tiny",
                    args=["--speedup", "0.2"]) as sim:
        yield sim


def _metric(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("workers", [1, 2])
def test_held_request_is_not_redecided_on_arrivals(cluster, omni_nginx, workers):
    """With 2 workers the requests are held by both, and released by
    whichever sees the load change: a worker woken through its eventfd
    posts exactly the entries released for it (the wake notes in the zone),
    and every held request is served."""
    sim = cluster
    nginx = omni_nginx(pd_policy="parallel", schedule_policy="omni",
                       prefill_max_num_seqs=1, core_num=workers,
                       prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=",".join(sim.decode_endpoints))
    sim.fault(sim.prefill_urls[0], mode="hang")
    socks = []
    try:
        socks.append(send_kept(nginx, "the request that fills the instance", 4))
        wait_until(lambda: any(i["inflight_requests"]
                               for i in nginx.status()["instances"]
                               if i["role"] == "prefill"),
                   timeout=20, what="the first request at the prefill engine")
        socks.append(send_kept(nginx, "the head of the queue", 4))
        wait_until(lambda: nginx.status()["queues"]["prefill_waiting"] == 1,
                   timeout=20, what="the head held")
        before = nginx.status()["scheduler"]
        for k in range(BURST):
            socks.append(send_kept(nginx, f"arrival {k} behind the head", 4))
        wait_until(lambda: nginx.status()["queues"]["prefill_waiting"]
                   == BURST + 1, timeout=30, what="the burst held")
        during = nginx.status()["scheduler"]
        # the engine serves again and the first client goes: every held
        # request is released in turn, decided again only when the
        # instance's load changes
        sim.fault(sim.prefill_urls[0], mode="none")
        socks.pop(0).close()
        wait_until(lambda: nginx.status()["totals"]["inflight_requests"] == 0,
                   timeout=60, what="the held requests served")
    finally:
        for sock in socks:
            sock.close()
        sim.fault(sim.prefill_urls[0], mode="none")

    after = nginx.status()["scheduler"]

    # the burst changed nothing the head's decision depends on: the
    # arrivals were held without deciding again about anyone (a few
    # decisions are allowed for the clock: the retry instants and the
    # decisions' 1 s lifetime)
    made = during["decisions"] - before["decisions"]
    assert made <= 6, (
        f"{made} policy decisions for {BURST} arrivals behind a held head "
        f"({during.get('decisions_reused', 0) - before.get('decisions_reused', 0)} "
        f"reused)")
    assert during["decisions_reused"] - before["decisions_reused"] >= BURST - 6

    # per held request, over its whole stay
    assert after["held_finished"] >= BURST + 1
    assert 1 <= after["held_decisions_max"] <= 8, after
    assert after["held_decisions"] <= 4 * after["held_finished"], after

    text = nginx.get("/metrics").text
    assert _metric(text, "omni_held_decisions_max") == after["held_decisions_max"]
    assert _metric(text, "omni_held_finished_total") == after["held_finished"]
    assert _metric(text, "omni_decisions_reused_total") >= after["decisions_reused"]
