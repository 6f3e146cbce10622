"""The stall of the P/D modes under load (issue 23), as a state, not a timing.

`omni-ctl bench-overhead` showed omni-parallel falling to 1/10-1/30 of its
rate in some rounds, and staying there.  The mechanism, measured with
/omni/status between rounds (docs/bench-notes/issue23.md):

1. wrk ends each round by closing its connections with requests in flight.
   A prefill leg that ends that way (client abort; or a background prefill
   leg cancelled by ngx_http_omni_cancel_leg) is finalized by nginx without
   its post-subrequest handler, and the request's cleanup reports the end of
   a prefill only in aggregated mode.  Its predictor job is never given back:
   `predictor.prefills_in_flight` of the instance stays above zero forever,
   and the predicted service of those jobs stays in the instance's pending
   work.
2. The predictor re-anchors an instance's predicted free time on every real
   completion as "now + the pending work still in flight".  With phantom jobs
   that pending work never drains, so every completion pushes the predicted
   free time one phantom backlog into the future.  Once that backlog exceeds
   `omni_hold_slack`, no instance is predicted free within the slack: every
   new request is held, and released only when the clock reaches the
   phantom free time; the next completion pushes it out again.  Throughput
   becomes (connections / backlog), latency the backlog: 788 req/s at p50 41
   ms in the bench, whatever the backend's real speed.

Correct behaviour, asserted here in both P/D modes: after clients abort
requests whose prefill legs are at the engine, the instance's predictor
holds no job of theirs (`prefills_in_flight` 0, `predicted_free_in_ms` 0),
just as its in-flight requests and tokens are back to 0; and an idle proxy
never holds a lone request afterwards (`queues.held_total` does not move).
The same holds in parallel mode for a prefill leg the proxy cancels because
the decode leg failed.

The engines are the simulator (sglang for parallel, vLLM for sequential),
its `hang` fault keeping the prefill legs at the engine until the clients
go.  The load-level check (one round under half of the others) stays in the
benchmark (`omni-ctl bench-overhead` exits non-zero on COLLAPSE, and on LEAK
when a round leaves an idle proxy with predicted prefill work in flight).
"""


import pytest

from conftest import send_kept, wait_until
from omni_ctl.sim.cluster import SimCluster

pytestmark = pytest.mark.timeout(180)

# mode: the simulator's engine for it
MODES = {"parallel": "sglang", "sequential": "vllm"}

# clients that abort with their prefill legs at the engine (a wrk round ends
# with 32; a few are enough for a backlog well past the 20 ms hold slack)
ABORTS = 4


@pytest.fixture(scope="module", params=list(MODES))
def cluster(request):
    mode = request.param
    with SimCluster(prefill=1, decode=1, engine=MODES[mode], preset="tiny",
                    args=["--speedup", "0.2"]) as sim:
        yield mode, sim


def _proxy(omni_nginx, mode, sim):
    return omni_nginx(pd_policy=mode, schedule_policy="omni",
                      prefill_endpoints=",".join(sim.prefill_endpoints),
                      decode_endpoints=",".join(sim.decode_endpoints))


def _in_proxy(nginx) -> int:
    return nginx.status()["totals"]["inflight_requests"]


def _prefill(status) -> list[dict]:
    return [i for i in status["instances"] if i["role"] == "prefill"]


def _ledger_idle(nginx):
    """The charges are back (what the existing tests check); returns the
    status seen then."""
    def idle():
        s = nginx.status()
        busy = [i for i in s["instances"]
                if i["inflight_requests"] or i["inflight_tokens"]]
        return s if not busy and s["totals"]["inflight_requests"] == 0 else None
    return wait_until(idle, timeout=20, what="in-flight requests and tokens at 0")


def test_aborted_prefill_legs_leave_no_predicted_work(cluster, omni_nginx):
    mode, sim = cluster
    nginx = _proxy(omni_nginx, mode, sim)
    hang = sim.prefill_urls[0]
    sim.fault(hang, mode="hang")
    socks = []
    try:
        for k in range(ABORTS):
            socks.append(send_kept(nginx, f"abandoned request number {k}", 8))
            wait_until(lambda: _in_proxy(nginx) == k + 1, timeout=20,
                       what=f"request {k + 1} in the proxy")
        # the legs the scheduler let go are at the (hanging) prefill engine
        wait_until(lambda: sum(i["inflight_requests"]
                               for i in _prefill(nginx.status())) >= 1,
                   timeout=20, what="a prefill leg at the engine")
        at_engine = sum(i["predictor"]["prefills_in_flight"]
                        for i in _prefill(nginx.status()))
        assert at_engine >= 1
        for sock in socks:              # wrk at the end of a round
            sock.close()
        socks = []
        status = _ledger_idle(nginx)
    finally:
        for sock in socks:
            sock.close()
        sim.fault(hang, mode="none")

    for inst in _prefill(status):
        pred = inst["predictor"]
        assert pred["prefills_in_flight"] == 0, (
            f"{mode}: {pred['prefills_in_flight']} phantom prefill job(s) of "
            f"aborted requests on {inst['address']} (had {at_engine} at the "
            f"engine); in-flight requests are {inst['inflight_requests']}")
        assert pred["predicted_free_in_ms"] == 0, (
            f"{mode}: idle {inst['address']} predicted busy for "
            f"{pred['predicted_free_in_ms']} ms")

    # the consequence: an idle proxy holds no request (none waits for the
    # predicted end of work nobody is doing)
    held = status["queues"]["held_total"]
    for k in range(5):
        resp = nginx.post("/v1/completions",
                          json={"prompt": f"lone request {k}", "max_tokens": 4})
        assert resp.status == 200, resp.text
        _ledger_idle(nginx)
    status = nginx.status()
    assert status["queues"]["held_total"] == held, (
        f"{mode}: {status['queues']['held_total'] - held} of 5 lone requests "
        f"to an idle proxy were held")


@pytest.fixture(scope="module")
def parallel_cluster():
    with SimCluster(prefill=1, decode=1, engine="sglang", preset="tiny",
                    args=["--speedup", "0.2"]) as sim:
        yield sim


def test_cancelled_prefill_leg_leaves_no_predicted_work(parallel_cluster, omni_nginx):
    """Parallel mode: the decode leg fails (500) while the prefill leg is at
    the engine, so the proxy cancels the prefill leg
    (ngx_http_omni_cancel_leg: a background leg is finalized at once, without
    its post-subrequest handler).  The client gets one error; the prefill
    instance's predictor must not keep the cancelled job."""
    sim = parallel_cluster
    nginx = _proxy(omni_nginx, "parallel", sim)
    sim.fault(sim.prefill_urls[0], mode="hang")
    sim.fault(sim.decode_urls[0], mode="error", status=500)
    try:
        for k in range(3):
            resp = nginx.post("/v1/completions",
                              json={"prompt": f"decode fails {k}", "max_tokens": 4},
                              timeout=60)
            assert resp.status >= 500, resp.text
            assert resp.json()["error"]["code"] == resp.status
        status = _ledger_idle(nginx)
    finally:
        sim.fault(sim.prefill_urls[0], mode="none")
        sim.fault(sim.decode_urls[0], mode="none")
    for inst in _prefill(status):
        pred = inst["predictor"]
        assert pred["prefills_in_flight"] == 0, (
            f"{pred['prefills_in_flight']} cancelled prefill job(s) still predicted "
            f"in flight on {inst['address']}")
        assert pred["predicted_free_in_ms"] == 0, pred


def test_bench_overhead_reports_what_a_round_left_behind():
    """The benchmark's own check (omni-ctl bench-overhead): a round after
    which an idle proxy still predicts prefill work in flight, or still has
    load charged, is listed as a LEAK (and the command fails), next to the
    COLLAPSE check of the rounds' rates."""
    from omni_ctl.bench import overhead

    clean = {"settled": True, "inflight_requests": 0, "prefill_jobs": 0,
             "predicted_busy_ms": 0.0, "held_total": 0, "decisions": 0,
             "requests": 100}
    runs = [{"target": "omni-parallel", "size": 1024, "round": 0, "rps": 9000,
             "after": clean},
            {"target": "omni-parallel", "size": 1024, "round": 1, "rps": 700,
             "after": {**clean, "prefill_jobs": 17, "predicted_busy_ms": 0.1}},
            {"target": "omni-sequential", "size": 1024, "round": 1, "rps": 8000,
             "after": {**clean, "settled": False, "inflight_requests": 2}},
            {"target": "nginx", "size": 1024, "round": 1, "rps": 20000}]
    found = overhead.leaks(runs)
    assert [(f["target"], f["round"]) for f in found] == [("omni-parallel", 1),
                                                          ("omni-sequential", 1)]
    text = overhead.markdown_overhead({"sizes": [1024], "duration_s": 1, "repeat": 2,
                                       "wrk_threads": 1, "connections": 32,
                                       "rows": [], "leaks": found})
    assert "**LEAK**: omni-parallel 1 KB after round 2, idle: 17 prefill job(s)" in text
    assert "load still charged" in text
