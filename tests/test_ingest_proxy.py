"""The KV-event agent feeding a real nginx: `omni-ctl agent --push` to the
module's `omni_ingest` location, in front of `omni-ctl sim` processes with
their real ZMQ KV-event publishers (port + 100, replay port + 200).

What an engine caches behind the proxy's back steers the proxy's choice; an
engine's cache reset removes it; health probes take an instance out of
scheduling and back; a killed agent changes nothing for clients and its
instances go approximate after the TTL; two proxies with their own agents
converge on one index."""

import json
import signal
import subprocess
import sys
import urllib.request
import time
from pathlib import Path

import pytest

from omni_ctl.sim.cluster import SimCluster

from conftest import free_port, wait_until, random_tokens as _tokens

pytestmark = pytest.mark.timeout(240)

BLOCK = 16



def _agent(nginx, *extra):
    """`omni-ctl agent` pushing to nginx's /omni/ingest; returns the Popen."""
    cmd = [str(Path(sys.executable).parent / "omni-ctl"), "agent",
           "--conf", str(nginx.conf_path),
           "--kv-events-port-offset", "100", "--kv-replay-port-offset", "200",
           "--metrics-interval", "0.2", "--health-interval", "0.2",
           "--health-timeout", "0.5", "--fall", "2", "--rise", "2",
           "--push", f"{nginx.url}/omni/ingest", *extra]
    log = open(nginx.prefix / "agent.log", "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _insts(nginx, role="prefill"):
    """address -> status entry of the instances of one role."""
    return {i["address"]: i for i in nginx.status()["instances"]
            if i["role"] == role}


def _all_precise(nginx):
    insts = nginx.status()["instances"]
    return all(i["agent"]["mode"] == "precise" for i in insts)


def _direct(url, prompt):
    """A completion sent straight to one simulated engine, not the proxy."""
    return _post_url(url, "/v1/completions",
                     {"model": "m", "prompt": prompt, "max_tokens": 1})


def _post_url(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status


def _via_proxy(nginx, prompt):
    """Send through the proxy; returns the prefill address it went to."""
    before = {a: i["requests_total"] for a, i in _insts(nginx).items()}
    resp = nginx.post("/v1/completions",
                      json={"model": "m", "prompt": prompt, "max_tokens": 2},
                      timeout=60)
    assert resp.status == 200, resp.text
    after = {a: i["requests_total"] for a, i in _insts(nginx).items()}
    went = [a for a in after if after[a] != before[a]]
    assert len(went) == 1, (before, after)
    return went[0]


def _last_completion(nginx):
    """The access log fields of the last client completion."""
    lines = [ln for ln in (nginx.prefix / "access.log").read_text().splitlines()
             if "POST /v1/completions" in ln]
    return dict(p.split("=", 1) for p in lines[-1].split() if "=" in p)


def _cluster():
    return SimCluster(prefill=2, decode=1, engine="vllm", preset="tiny",
                      args=["--kv-events", "--num-blocks", "4096"])


def _proxy(omni_nginx, sim, policy="cache-aware", **kw):
    return omni_nginx(prefill_endpoints=",".join(sim.prefill_endpoints),
                      decode_endpoints=",".join(sim.decode_endpoints),
                      pd_policy="sequential", block_size=BLOCK,
                      schedule_policy=policy, **kw)


def _addrs(sim):
    """The prefill instances' host:port (endpoints may carry @bootstrap)."""
    return [e.split("@", 1)[0] for e in sim.prefill_endpoints]


def _stored(nginx, addr):
    return _insts(nginx)[addr]["agent"]["blocks_stored"]


@pytest.mark.parametrize("policy", ["cache-aware", "omni"])
def test_engine_cache_steers_and_reset_stops_it(omni_nginx, policy):
    """With either policy (`omni` is the default), a prefix an engine cached
    from requests that never passed the proxy steers the proxy's choice."""
    with _cluster() as sim:
        nginx = _proxy(omni_nginx, sim, policy)
        agent = _agent(nginx)
        try:
            wait_until(lambda: _all_precise(nginx), timeout=30,
                       what="every instance precise")
            urls = dict(zip(_addrs(sim), sim.prefill_urls))
            for k, addr in enumerate(_addrs(sim)):
                # long enough that the cached part outweighs what the
                # predictor has not learned yet about an instance's speed
                prompt = _tokens(BLOCK * 96, f"steer-{k}")
                base = _stored(nginx, addr)
                _direct(urls[addr], prompt)
                # the engine's stores reach the proxy's index
                wait_until(lambda: _stored(nginx, addr) >= base + 90,
                           timeout=30, what="stores applied")
                # a prompt sharing that prefix goes where the engine has it
                ask = prompt + _tokens(BLOCK * 2, f"tail-{k}")
                assert _via_proxy(nginx, ask) == addr
                # the prediction next to what the engine reports
                line = _last_completion(nginx)
                assert int(line["cached_tokens"]) == len(prompt)
                assert int(line["engine_cached_tokens"]) == len(prompt)
                check = _insts(nginx)[addr]["cache_check"]
                assert check["checked"] >= 1
                assert check["missing"] == 0 and check["unpredicted"] == 0

            # an engine cache reset (AllBlocksCleared) empties its index
            addr = _addrs(sim)[0]
            clears = _insts(nginx)[addr]["agent"]["clears"]
            assert _post_url(urls[addr], "/reset_prefix_cache", {}) == 200
            wait_until(lambda: _insts(nginx)[addr]["agent"]["clears"] > clears,
                       timeout=30, what="clear applied")
            assert _insts(nginx)[addr]["cache"]["precise"] == 0
            # the KV capacity comes from the engines' /metrics
            assert all(i["agent"]["capacity_tokens"] > 0
                       for i in nginx.status()["instances"])
            st = nginx.status()
            assert st["ingest"]["rejected"] == 0
            assert st["ingest"]["batches"] > 0
        finally:
            _stop(agent)


def test_bad_batches_are_rejected_and_counted(omni_nginx):
    nginx = omni_nginx()
    resp = nginx.request("POST", "/omni/ingest", body=b"\x00" * 40,
                         headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 400
    assert resp.text
    assert nginx.status()["ingest"]["rejected"] == 1
    assert nginx.get("/omni/ingest").status == 405
    m = nginx.get("/metrics").text
    assert "omni_ingest_rejected_total 1" in m
    nginx.allow("ingest batch rejected")


def test_killed_agent_changes_nothing_for_clients(omni_nginx):
    with _cluster() as sim:
        nginx = _proxy(omni_nginx, sim)
        agent = _agent(nginx)
        try:
            wait_until(lambda: _all_precise(nginx), timeout=30,
                       what="every instance precise")
            agent.kill()
            agent.wait()
            for k in range(4):
                resp = nginx.post("/v1/completions", json={
                    "model": "m", "prompt": _tokens(64, f"kill-{k}"),
                    "max_tokens": 2}, timeout=60)
                assert resp.status == 200, resp.text
            # a silent agent: approximate after the TTL (5 s)
            wait_until(lambda: all(i["agent"]["mode"] == "approximate"
                                   for i in nginx.status()["instances"]),
                       timeout=30, what="instances approximate")
        finally:
            _stop(agent)


def _agent_inst(port, addr):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status",
                                timeout=10) as r:
        insts = json.loads(r.read())["instances"]
    return next(i for i in insts if i["name"] == addr)


def test_health_takes_an_instance_out_and_back(omni_nginx):
    """Out within `fall` and back within `rise` probes (2 and 2) counted from
    the change: probes start every interval even while the engine's /health
    hangs past the timeout, and a hung probe answering late does not undo a
    newer one.  Counted in probe rounds (the agent's own sequence numbers),
    not seconds, so a slow machine cannot fail it; no client request fails
    meanwhile."""
    sport = free_port()
    with _cluster() as sim:
        nginx = _proxy(omni_nginx, sim)
        agent = _agent(nginx, "--status-listen", f"127.0.0.1:{sport}")
        try:
            wait_until(lambda: all(i["agent"]["health"] == "up"
                                   for i in nginx.status()["instances"]),
                       timeout=30, what="every instance up")
            addr = _addrs(sim)[0]
            url = dict(zip(_addrs(sim), sim.prefill_urls))[addr]
            t0 = time.monotonic()
            _post_url(url, "/sim/fault", {"mode": "hang"})
            p0 = _agent_inst(sport, addr)["probes"]
            wait_until(lambda: not _insts(nginx)[addr]["healthy"],
                       timeout=30, what="instance out")
            print(f"out after {time.monotonic() - t0:.2f}s")
            st = _agent_inst(sport, addr)
            assert st["health"] == "down"
            assert st["probe_flip"] <= p0 + 2, (p0, st)
            assert _insts(nginx)[addr]["agent"]["health"] == "down"
            other = _addrs(sim)[1]
            for k in range(4):
                assert _via_proxy(nginx, _tokens(64, f"h-{k}")) == other
            # while /health hangs (0.5 s timeout, 0.2 s period) probes
            # overlap: the schedule does not wait for the hung ones
            def overlap():
                i = _agent_inst(sport, addr)
                return i["probes"] - i["probe_applied"] >= 2
            wait_until(overlap, timeout=30, what="two probes in flight")
            t0 = time.monotonic()
            _post_url(url, "/sim/fault", {"mode": "none"})
            p0 = _agent_inst(sport, addr)["probes"]
            wait_until(lambda: _insts(nginx)[addr]["healthy"],
                       timeout=30, what="instance back")
            print(f"back after {time.monotonic() - t0:.2f}s")
            st = _agent_inst(sport, addr)
            assert st["health"] == "up"
            assert st["probe_flip"] <= p0 + 2, (p0, st)
            for k in range(4):
                resp = nginx.post("/v1/completions", json={
                    "model": "m", "prompt": _tokens(64, f"hb-{k}"),
                    "max_tokens": 2}, timeout=60)
                assert resp.status == 200, resp.text
        finally:
            _stop(agent)


def test_two_proxies_converge(omni_nginx):
    """Two proxies in front of one cluster, each with its own agent, hold
    the same precise index; the second agent starts after the traffic and
    catches up from the engines' replay buffers."""
    with _cluster() as sim:
        a = _proxy(omni_nginx, sim)
        b = _proxy(omni_nginx, sim)
        agents = [_agent(a)]
        try:
            wait_until(lambda: _all_precise(a), timeout=30,
                       what="every instance precise")
            for k in range(6):
                n = (a, b)[k % 2]
                resp = n.post("/v1/completions", json={
                    "model": "m", "prompt": _tokens(BLOCK * 8, f"two-{k}"),
                    "max_tokens": 2}, timeout=60)
                assert resp.status == 200, resp.text
            agents.append(_agent(b))

            def same():
                x = {ad: i["cache"]["precise"] for ad, i in _insts(a).items()}
                y = {ad: i["cache"]["precise"] for ad, i in _insts(b).items()}
                return x == y and sum(x.values()) >= 6 * 8
            wait_until(same, timeout=30, what="the same precise index")
        finally:
            for p in agents:
                _stop(p)


def test_start_and_stop_run_the_agent(omni_nginx):
    """gen-conf's KV-event options: `omni-ctl start` runs the agent (pushing
    to /omni/ingest), `omni-ctl stop` stops it."""
    from omni_ctl import nginxctl
    from omni_ctl.agent import control as agentctl
    with _cluster() as sim:
        nginx = _proxy(omni_nginx, sim, kv_events_port_offset=100,
                       kv_replay_port_offset=200)
        text = nginx.conf_path.read_text()
        assert ("# omni-ctl: agent --kv-events-port-offset 100 "
                "--kv-replay-port-offset 200") in text
        svc = nginxctl.agent_service(nginxctl.read_conf(nginx.conf_path))
        pid = agentctl.running_pid(svc)
        assert pid is not None
        wait_until(lambda: _all_precise(nginx), timeout=30,
                   what="every instance precise")
        nginx.stop()
        assert agentctl.running_pid(svc) is None
        assert not svc.pid_file.exists()


def test_no_agent_without_kv_event_options(omni_nginx):
    from omni_ctl import nginxctl
    nginx = omni_nginx()
    assert "# omni-ctl: agent" not in nginx.conf_path.read_text()
    assert nginxctl.agent_service(nginxctl.read_conf(nginx.conf_path)) is None


def test_unfillable_gap_falls_back_to_approximate_and_recovers(omni_nginx):
    """Without a replay endpoint a lost KV-event message cannot be replayed:
    the agent clears the instance and marks it approximate; after a
    gap-free --settle period it is precise again."""
    with _cluster() as sim:
        nginx = _proxy(omni_nginx, sim)
        cmd_extra = ("--settle", "1", "--idle-check", "60")
        agent = subprocess.Popen(
            [str(Path(sys.executable).parent / "omni-ctl"), "agent",
             "--conf", str(nginx.conf_path), "--kv-events-port-offset", "100",
             "--metrics-interval", "0.2", "--health-interval", "0",
             "--push", f"{nginx.url}/omni/ingest", *cmd_extra],
            stdout=open(nginx.prefix / "agent.log", "wb"),
            stderr=subprocess.STDOUT)
        try:
            addr = _addrs(sim)[0]
            url = dict(zip(_addrs(sim), sim.prefill_urls))[addr]
            # no replay: approximate at start, precise once events flowed
            # for --settle seconds without a gap
            k = 0
            deadline = time.monotonic() + 60
            while _insts(nginx)[addr]["agent"]["mode"] != "precise":
                assert time.monotonic() < deadline, "never precise"
                _direct(url, _tokens(BLOCK * 2, f"gap-{k}"))
                k += 1
                time.sleep(0.1)
            resyncs = _insts(nginx)[addr]["agent"]["resyncs"]
            clears = _insts(nginx)[addr]["agent"]["clears"]
            _post_url(url, "/sim/fault", {"mode": "kv_drop", "rate": 0.5})
            deadline = time.monotonic() + 60
            while _insts(nginx)[addr]["agent"]["resyncs"] == resyncs:
                assert time.monotonic() < deadline, "no resync"
                _direct(url, _tokens(BLOCK * 2, f"gap-{k}"))
                k += 1
            st = _insts(nginx)[addr]["agent"]
            assert st["mode"] == "approximate"
            # its precise state was dropped (the agent's CLEAR)
            assert st["clears"] > clears
            _post_url(url, "/sim/fault", {"mode": "none"})
            # events flowing without a gap: precise again
            deadline = time.monotonic() + 60
            while _insts(nginx)[addr]["agent"]["mode"] != "precise":
                assert time.monotonic() < deadline, "not precise again"
                _direct(url, _tokens(BLOCK * 2, f"gap-{k}"))
                k += 1
                time.sleep(0.1)
        finally:
            _stop(agent)
