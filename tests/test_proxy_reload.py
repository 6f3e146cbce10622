"""The shared zone survives `nginx -s reload`: counters keep counting, an
instance keeps its record across a changed endpoint list, and every worker of
the new generation schedules (there is no elected scheduler worker that a
reload could lose)."""

import time

import pytest

from omni_ctl.sim.cluster import SimCluster

pytestmark = pytest.mark.timeout(120)


def _by_addr(status):
    return {(i["role"], i["address"]): i for i in status["instances"]}


def _wait_new_workers(nginx, old, timeout=15.0):
    deadline = time.monotonic() + timeout
    while set(nginx.workers) & set(old) or not nginx.workers:
        assert time.monotonic() < deadline, "old workers still running"
        time.sleep(0.05)


def test_reload_keeps_state_and_schedules(omni_nginx):
    with SimCluster(prefill=1, decode=3, engine="vllm", preset="tiny") as sim:
        first, extra = sim.decode_endpoints[:2], sim.decode_endpoints[2]
        nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                           decode_endpoints=",".join(first),
                           schedule_policy="round-robin")
        body = {"prompt": "x", "max_tokens": 2, "ignore_eos": True}
        for _ in range(6):
            assert nginx.post("/v1/completions", json=body).status == 200
        before = nginx.status()
        assert before["totals"]["requests"] == 6
        old_workers = nginx.workers

        nginx.reload(decode_endpoints=",".join(first + [extra]))
        _wait_new_workers(nginx, old_workers)

        after = nginx.status()
        assert after["config_generation"] == before["config_generation"] + 1
        assert after["totals"]["requests"] >= 6
        old_rec, new_rec = _by_addr(before), _by_addr(after)
        for key, rec in old_rec.items():
            assert new_rec[key]["requests_total"] == rec["requests_total"], key
        assert new_rec[("decode", extra)]["requests_total"] == 0

        # the new workers schedule over all three decode instances
        for _ in range(9):
            assert nginx.post("/v1/completions", json=body).status == 200
        final = _by_addr(nginx.status())
        for addr in first + [extra]:
            assert final[("decode", addr)]["requests_total"] > \
                old_rec.get(("decode", addr), {"requests_total": 0})["requests_total"]
        assert all(i["inflight_requests"] == 0 for i in final.values())
