"""Binary upgrade under load (nginx's USR2, WINCH, QUIT on the master, as
`omni-ctl upgrade` sends them): every request gets one well-formed answer,
and the counters reconcile.

Real nginx (the Debian binary at its absolute path, so the old master can
exec it again on USR2) + the simulator (1 prefill + 1 decode, vLLM protocol,
sequential P/D).  The prefill instance is slow and takes one request at a
time, so that when USR2 comes some requests are in flight and some are held
in the old master's queue.  The new master has a shared zone of its own: it
counts only the requests it took, and the old master's books go with it;
each master's books must be back at zero.
"""

import threading
import time

import pytest

from omni_ctl import nginxctl
from omni_ctl.sim.cluster import SimCluster
from test_proxy_reload_load import _stream, _well_formed

pytestmark = pytest.mark.timeout(240)

N = 8


@pytest.fixture(scope="module")
def sim():
    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny",
                    args=["--speedup", "0.2"]) as cluster:
        yield cluster


def _zero(st):
    busy = [(i["address"], i["inflight_requests"], i["inflight_tokens"])
            for i in st["instances"] if i["inflight_requests"] or i["inflight_tokens"]]
    q = st["queues"]
    return (not busy and st["totals"]["inflight_requests"] == 0
            and q["prefill_waiting"] == 0 and q["decode_waiting"] == 0), busy


def test_binary_upgrade_under_load_loses_nothing(omni_nginx, sim):
    nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                       decode_endpoints=sim.decode_endpoints[0],
                       schedule_policy="omni", prefill_max_num_seqs=1,
                       prefill_read_timeout="60s", core_num=2)
    old_master = nginx.pid
    old_workers = nginx.workers
    assert old_master and old_workers
    sim.fault(sim.prefill_urls[0], mode="slow", factor=100)
    results = {}
    first = [threading.Thread(target=_stream, args=(nginx, k, results))
             for k in range(N)]
    later = [threading.Thread(target=_stream, args=(nginx, N + k, results))
             for k in range(N)]
    upgraded = {}

    def upgrade():
        upgraded["status"] = nginxctl.upgrade(nginx.conf_path, timeout=30,
                                              drain_timeout=150)

    up = threading.Thread(target=upgrade)
    try:
        for t in first:
            t.start()
        deadline = time.monotonic() + 30
        while True:
            st = nginx.status()
            if st["queues"]["prefill_waiting"] >= 2 and st["totals"]["inflight_requests"] == N:
                break
            assert time.monotonic() < deadline, (st["queues"], st["totals"])
            time.sleep(0.05)
        requests_before = st["totals"]["requests"]
        up.start()
        # the new master is up (the old one renamed its pid file): more
        # requests while the old workers still finish theirs
        deadline = time.monotonic() + 30
        while nginx.pid in (None, old_master):
            assert time.monotonic() < deadline, "no new master after USR2"
            time.sleep(0.05)
        for t in later:
            t.start()
        time.sleep(0.5)
        sim.fault(sim.prefill_urls[0], mode="none", instance="all")
        up.join(200)
        assert not up.is_alive()
    finally:
        sim.fault(sim.prefill_urls[0], mode="none", instance="all")
        for t in first + later:
            t.join(120)
    assert "status" in upgraded, "upgrade did not finish"
    new_master = upgraded["status"].pid
    assert new_master != old_master and nginx.pid == new_master
    assert not set(nginx.workers) & set(old_workers)
    assert not nginxctl.is_master_of(old_master, nginx.conf_path)
    assert not any(t.is_alive() for t in first + later)
    assert sorted(results) == list(range(2 * N))
    kinds = [_well_formed(*results[k]) for k in range(2 * N)]
    # the old master's requests were finished by its workers, not cut
    assert kinds[:N].count("ok") == N, kinds
    assert requests_before >= N
    # the new master's books: only what it took, and all of it given back
    deadline = time.monotonic() + 30
    while True:
        st = nginx.status()
        zero, busy = _zero(st)
        if zero:
            break
        assert time.monotonic() < deadline, busy
        time.sleep(0.05)
    # the later requests went to either master (both accept until WINCH):
    # the new one counts no more than those, and none of the first wave
    taken = st["totals"]["requests"]
    assert 0 <= taken <= N, taken
    # and it serves
    resp = nginx.post("/v1/completions", json={"prompt": "after", "max_tokens": 2})
    assert resp.status == 200, resp.text
    assert nginx.status()["totals"]["requests"] == taken + 1
