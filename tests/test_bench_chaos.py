"""`omni-ctl chaos`: the schedule, the outcome of each request, and the
injector against a real simulated cluster."""

import time

import pytest

from omni_ctl.bench import chaos
from omni_ctl.bench.errors import BenchError
from omni_ctl.bench.metrics import RequestRecord
from omni_ctl.sim.cluster import SimCluster


def test_schedule_in_seconds_and_percent_sorted_by_time():
    acts = chaos.parse_schedule("50%:reload; 2s:prefill-0=error,status=503;"
                                "1:decode-1=exit;80%:kill-worker", span_s=10.0)
    assert [(a.at_s, a.kind, a.instance) for a in acts] == [
        (1.0, "fault", "decode-1"), (2.0, "fault", "prefill-0"),
        (5.0, "reload", None), (8.0, "kill-worker", None)]
    assert acts[1].fault["status"] == 503 and acts[1].fault["mode"] == "error"


@pytest.mark.parametrize("text, why", [
    ("prefill-0=error", "TIME:ACTION"),
    ("x:reload", "TIME:ACTION"),
    ("5s:prefill-0=explode", "unknown fault mode"),
    ("5s:prefill-0=error,status=200", "HTTP error status"),
])
def test_bad_schedules_say_what_is_wrong(text, why):
    with pytest.raises(BenchError, match=why):
        chaos.parse_schedule(text, span_s=10.0)


def test_default_schedule_has_every_fault_kind_and_both_proxy_actions():
    acts = chaos.parse_schedule(chaos.DEFAULT_SCHEDULE, span_s=100.0)
    modes = {a.fault["mode"] for a in acts if a.kind == "fault"}
    assert {"error", "exit", "hang", "stall", "drop"} <= modes
    assert {"reload", "kill-worker"} <= {a.kind for a in acts}
    # every instance that was broken is set back to normal later
    last = {}
    for a in acts:
        if a.kind == "fault":
            last[a.instance] = a.fault["mode"]
    assert set(last.values()) == {"none"}


def _rec(ok=False, kind=None, error_json=None):
    r = RequestRecord(index=0, session=0, turn=0)
    r.ok, r.error_kind, r.error_json = ok, kind, error_json
    return r


@pytest.mark.parametrize("rec, outcome", [
    (_rec(ok=True), "ok"),
    (_rec(kind="http_502", error_json=True), "error"),
    (_rec(kind="http_502", error_json=False), "malformed"),
    (_rec(kind="stream_error"), "error"),
    (_rec(kind="timeout"), "hung"),
    (_rec(kind="disconnect"), "closed"),
    (_rec(kind="incomplete_stream"), "malformed"),
    (_rec(kind="bad_response"), "malformed"),
])
def test_each_request_gets_one_outcome(rec, outcome):
    assert chaos.classify(rec) == outcome


def test_outcome_table_counts_and_kinds():
    recs = [_rec(ok=True), _rec(ok=True), _rec(kind="http_503", error_json=True),
            _rec(kind="timeout")]
    t = chaos.outcome_table(recs)
    assert t["counts"] == {"sent": 4, "ok": 2, "error": 1, "closed": 0, "hung": 1,
                           "malformed": 0}
    assert t["kinds"]["error"] == {"http_503": 1} and t["kinds"]["hung"] == {"timeout": 1}


def test_injector_breaks_and_revives_real_instances():
    """A real simulated cluster: an exited instance is revived through
    another one; the injector records each action."""
    with SimCluster(prefill=2, decode=1, engine="vllm", preset="tiny") as sim:
        acts = chaos.parse_schedule("0s:prefill-1=exit;0.3s:prefill-0=error;"
                                    "0.6s:prefill-1=none;0.6s:prefill-0=none", 1.0)
        inj = chaos.Injector(acts, sim)
        inj.start(time.perf_counter())
        deadline = time.monotonic() + 30
        while len(inj.done) < len(acts) and time.monotonic() < deadline:
            time.sleep(0.05)
        inj.stop()
        assert [d["ok"] for d in inj.done] == [True] * 4, inj.done
        st = sim.get_json(sim.urls[0] + "/sim/stats")
        alive = {i["name"]: i["alive"] for i in st["cluster"]}
        assert alive == {"prefill-0": True, "prefill-1": True, "decode-0": True}
        # an action naming no instance is recorded as failed, not raised
        bad = chaos.Injector(chaos.parse_schedule("0s:prefill-9=exit", 1.0), sim)
        bad.start(time.perf_counter())
        bad.stop()
        assert bad.done and not bad.done[0]["ok"] and "prefill-9" in bad.done[0]["result"]
