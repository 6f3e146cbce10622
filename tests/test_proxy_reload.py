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


# -- what a reload may change in the zone (docs/internals.md, "Reload")

import http.client  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402

from omni_ctl.nginxctl import NginxCtlError  # noqa: E402


@pytest.fixture(scope="module")
def sim_pd():
    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny",
                    args=["--speedup", "0.2"]) as sim:
        yield sim


def _post(nginx, results, timeout=90):
    try:
        conn = http.client.HTTPConnection(nginx.host, nginx.port, timeout=timeout)
        conn.request("POST", "/v1/completions",
                     body=json.dumps({"prompt": "reload " * 30, "max_tokens": 2,
                                      "ignore_eos": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        results.append((resp.status, resp.getheader("Retry-After"), resp.read()))
        conn.close()
    except OSError as exc:
        results.append((None, None, repr(exc).encode()))


def _hold(nginx, sim, n=4):
    """The prefill instance is slow (seconds a prefill): one request is in
    flight on it, the rest are held (omni_prefill_max_num_seqs 1)."""
    sim.fault(sim.prefill_urls[0], mode="slow", factor=400)
    results = []
    threads = [threading.Thread(target=_post, args=(nginx, results)) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while nginx.status()["queues"]["prefill_waiting"] < n - 1:
        assert time.monotonic() < deadline, nginx.status()["queues"]
        time.sleep(0.05)
    return threads, results


def _release(sim, threads):
    sim.fault(sim.prefill_urls[0], mode="none", instance="all")
    for t in threads:
        t.join(120)
        assert not t.is_alive()


def _idle(nginx, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        st = nginx.status()
        busy = [i for i in st["instances"]
                if i["inflight_requests"] or i["inflight_tokens"] or i["prefilling"]
                or i["predictor"]["prefills_in_flight"]]
        q = st["queues"]
        if not busy and not st["totals"]["inflight_requests"] \
                and not q["prefill_waiting"] and not q["decode_waiting"]:
            return st
        assert time.monotonic() < deadline, (busy, st["totals"], q)
        time.sleep(0.05)


def _proxy(omni_nginx, sim, **kw):
    kw.setdefault("prefill_max_num_seqs", 1)
    nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                       decode_endpoints=sim.decode_endpoints[0],
                       schedule_policy="omni", prefill_read_timeout="60s", **kw)
    return nginx


# (option, new value, config key, value the zone keeps when refused)
REFUSED = [
    ("block_size", 128, "block_size", 256),
    ("queue_max", 8192, "queue_max", 4096),
    ("cache_ttl", "300s", "cache_ttl_ms", 600000),
]


@pytest.mark.parametrize("option,value,key,kept", REFUSED)
def test_reload_refused_keeps_the_old_config(omni_nginx, sim_pd, option, value,
                                             key, kept):
    """A change the zone cannot take is refused with [emerg] naming the
    directive and both values; the old configuration keeps serving and the
    held requests are answered."""
    nginx = _proxy(omni_nginx, sim_pd)
    nginx.allow(r"\[emerg\].*omni_" + option)
    assert nginx.status()["config"][key] == kept
    threads, results = _hold(nginx, sim_pd)
    workers = nginx.workers
    with pytest.raises(NginxCtlError) as err:
        nginx.reload(**{option: value})
    text = str(err.value)
    assert f'"omni_{option}"' in text, text
    new = {"block_size": "128", "queue_max": "8192", "cache_ttl": "300000ms"}[option]
    old = {"block_size": "256", "queue_max": "4096", "cache_ttl": "600000ms"}[option]
    assert new in text and old in text, text
    assert nginx.workers == workers
    st = nginx.status()
    assert st["config"][key] == kept and st["config_generation"] == 1
    _release(sim_pd, threads)
    assert sorted(r[0] for r in results) == [200] * len(threads), results
    _idle(nginx)


def test_reload_applies_smaller_queue_and_cache_blocks(omni_nginx, sim_pd):
    nginx = _proxy(omni_nginx, sim_pd)
    threads, results = _hold(nginx, sim_pd)
    old = nginx.workers
    nginx.reload(queue_max=1024, cache_blocks=64)
    _wait_new_workers(nginx, old)
    st = nginx.status()
    assert st["config"]["queue_max"] == 1024
    assert st["config"]["queue_capacity"] == 4096     # the zone's arrays
    assert st["config"]["cache_blocks"] == 64
    assert st["config_generation"] == 2
    _release(sim_pd, threads)
    assert sorted(r[0] for r in results) == [200] * len(threads), results
    resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert resp.status == 200
    st = _idle(nginx)
    for inst in st["instances"]:
        assert inst["cache"]["blocks"] <= 64


def test_reload_changing_pd_policy_never_rebinds_held_requests(omni_nginx, sim_pd):
    """Requests held under sequential mode when the reload makes the proxy
    aggregated are served in their own mode by their own workers, or
    answered 503 with Retry-After: never bound for the other tier."""
    nginx = _proxy(omni_nginx, sim_pd)
    threads, results = _hold(nginx, sim_pd)
    old = nginx.workers
    nginx.reload(pd_policy="aggregated", prefill_endpoints="")
    _wait_new_workers(nginx, old)
    assert nginx.status()["config"]["pd_policy"] == "aggregated"
    # a request of the new mode while the old ones are still held
    fresh = []
    _post(nginx, fresh)
    _release(sim_pd, threads)
    for status, retry_after, body in results:
        assert status in (200, 503), (status, body)
        if status == 503:
            assert retry_after and json.loads(body)["error"]["code"] == 503
    assert fresh[0][0] in (200, 503), fresh
    _idle(nginx)


def test_reused_slot_starts_empty(omni_nginx):
    """Every slot of the zone is taken (1024 instances); a reload replaces
    the prefill instance, whose slot (retired, idle) goes to the new one:
    it starts with no cached blocks and no predictor state."""
    from conftest import free_port

    with SimCluster(prefill=2, decode=1, engine="vllm", preset="tiny") as sim:
        # endpoints nobody listens on fill the slots; the one request below
        # is placed on the first decode instance (least loaded, first)
        fakes = [f"127.0.0.1:{free_port()}" for _ in range(1022)]
        decode = ",".join([sim.decode_endpoints[0]] + fakes)
        nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                           decode_endpoints=decode,
                           schedule_policy="cache-aware")
        resp = nginx.post("/v1/completions",
                          json={"prompt": list(range(1, 700)), "max_tokens": 2},
                          timeout=60)
        assert resp.status == 200, resp.text

        def prefill(st):
            return [i for i in st["instances"] if i["role"] == "prefill"][0]

        before = prefill(nginx.status())
        assert before["address"] == sim.prefill_endpoints[0]
        assert before["cache"]["blocks"] > 0, before
        assert before["predictor"]["prefill_samples"] > 0 or \
            before["predictor"]["prefill_mape"] > 0, before["predictor"]

        old = nginx.workers
        nginx.reload(prefill_endpoints=sim.prefill_endpoints[1], timeout=60)
        _wait_new_workers(nginx, old, timeout=60)
        after = prefill(nginx.status())
        assert after["address"] == sim.prefill_endpoints[1]
        assert after["slot"] == before["slot"], (before["slot"], after["slot"])
        assert after["cache"]["blocks"] == 0, after["cache"]
        p = after["predictor"]
        assert p["prefill_samples"] == 0 and p["decode_samples"] == 0, p
        assert p["prefills_in_flight"] == 0 and p["completion_mape"] == 0, p
        assert after["requests_total"] == 0


def test_reload_refuses_more_instances_than_the_index_holds(omni_nginx, sim_pd):
    """The prefix index is sized for the instances at zone creation (twice
    as many, at least 64): a reload past it is refused, naming both counts,
    and the old configuration keeps serving."""
    from conftest import free_port

    nginx = _proxy(omni_nginx, sim_pd)
    cap = nginx.status()["config"]["index_instances"]
    assert cap == 64
    nginx.allow(r"\[emerg\].*instances are configured")
    fakes = [f"127.0.0.1:{free_port()}" for _ in range(cap)]
    workers = nginx.workers
    with pytest.raises(NginxCtlError) as err:
        nginx.reload(decode_endpoints=",".join([sim_pd.decode_endpoints[0]] + fakes))
    text = str(err.value)
    assert f"{cap + 2} instances are configured" in text and f"built for {cap}" in text, text
    assert nginx.workers == workers
    st = nginx.status()
    assert len(st["instances"]) == 2 and st["config_generation"] == 1
    resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert resp.status == 200, resp.text
    _idle(nginx)
