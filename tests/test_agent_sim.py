"""`omni-ctl agent` against a real `omni-ctl sim` process (HTTP, ZMQ PUB and
replay on loopback): requests' cached prefixes, /metrics capacity and load,
/health with fall/rise, and the CLI reading the instances from a config
rendered by `omni-ctl gen-conf`."""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner

from omni_ctl.agent import batch as B
from omni_ctl.agent.batch import split_batches
from omni_ctl.agent.config import AgentConfigError, build_specs, read_nginx_conf
from omni_ctl.agent.core import Agent, Options
from omni_ctl.agent.sinks import ListSink
from omni_ctl.cli import main
from omni_ctl.scoring import IngestTarget, PrefixIndex, lib
from omni_ctl.sim.cluster import SimCluster

pytestmark = pytest.mark.timeout(120)

NUM_BLOCKS = 40


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read() or b"{}")


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def published(url):
    return get_json(url + "/sim/stats")["instance"]["kv_events"]["published"]


async def until(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def sim(engine="vllm", **kw):
    return SimCluster(prefill=0, decode=0, both=1, engine=engine, preset="tiny",
                      args=["--hash-seed", "7", "--kv-events", "--num-blocks",
                            str(NUM_BLOCKS)], **kw)


def agent_for(cluster, sink, **kw):
    addr = cluster.decode_endpoints[0]
    specs = build_specs([addr], kv_port_offset=100, replay_port_offset=200)
    o = dict(block_size=16, metrics_interval=0.1, health_interval=0.1,
             health_timeout=0.5, fall=2, rise=2, flush_interval=0.01)
    o.update(kw)
    return addr, Agent(specs, sink, Options(**o))


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_cached_prefixes_metrics_and_health(engine):
    with sim(engine) as cluster:
        url = cluster.decode_urls[0]

        async def main():
            sink = ListSink()
            addr, agent = agent_for(cluster, sink)
            await agent.start()
            try:
                inst = agent.instances[0]
                await until(lambda: inst.mode == "precise" and inst.health == "up",
                            what="precise and up")
                prompts = [list(range(400 * k + 1, 400 * k + 1 + 100)) for k in range(8)]
                for p in prompts:      # 8 x 6 blocks through 40: evictions
                    await in_thread(post, url + "/v1/completions",
                                    {"prompt": p, "max_tokens": 1})
                n = await in_thread(published, url)
                await until(lambda: inst.streams[0].next == n, what="all events")
                await until(lambda: sink.records(addr, B.METRICS), what="a scrape")
                await agent.flush()

                ix = PrefixIndex(1, 16, 1000)
                t = IngestTarget(ix, {addr: 0})
                for b in sink.batches:
                    t.apply(b.encode(), now_us=1)
                ix.check_integrity()
                truth = (await in_thread(get_json, url + "/sim/cache"))["hashes"]
                # the index holds what the engine holds, block for block
                assert ix.stats()["precise"] == len(truth) > 0
                assert ix.match(prompts[-1], now_us=1) == [100 // 16]
                assert ix.stats()["removed"] > 0
                s = t.instance(0)
                assert s["mode"] == "precise" and s["health"] == "up"
                assert s["capacity_tokens"] == NUM_BLOCKS * 16
                # precise: the engine's capacity and room for marks of
                # prompts sent and not yet stored (omni_ingest.h)
                assert (ix.instance_stats(0)["capacity"]
                        == NUM_BLOCKS * lib.OMNI_INGEST_PRECISE_ROOM)

                # /health hangs: down within fall probes; back after rise
                await in_thread(post, url + "/sim/fault", {"mode": "hang"})
                await until(lambda: inst.health == "down", what="down")
                await in_thread(post, url + "/sim/fault", {"mode": "none"})
                await until(lambda: inst.health == "up", what="up again")
                await agent.flush()
                states = [r[2]["health"] for r in sink.records(addr, B.STATE)]
                assert states[-2:] == ["down", "up"]
            finally:
                await agent.stop()
        asyncio.run(asyncio.wait_for(main(), 100))


def test_reset_prefix_cache_clears_the_instance():
    with sim() as cluster:
        url = cluster.decode_urls[0]

        async def main():
            sink = ListSink()
            addr, agent = agent_for(cluster, sink, metrics_interval=0, health_interval=0)
            await agent.start()
            try:
                inst = agent.instances[0]
                await until(lambda: inst.mode == "precise", what="precise")
                p = list(range(1, 65))
                await in_thread(post, url + "/v1/completions", {"prompt": p, "max_tokens": 1})
                await in_thread(post, url + "/reset_prefix_cache", {})
                n = await in_thread(published, url)
                await until(lambda: inst.streams[0].next == n, what="all events")
                await agent.flush()
                ix = PrefixIndex(1, 16, 1000)
                t = IngestTarget(ix, {addr: 0})
                recs = sink.records(addr)
                stored = [i for i, r in enumerate(recs)
                          if r[0] == B.STORE and r[2]["tokens"] == p]
                assert stored, "the prompt's blocks were never stored"
                assert any(r[0] == B.CLEAR for r in recs[stored[0]:])
                for b in sink.batches:
                    t.apply(b.encode(), now_us=1)
                assert ix.match(p, now_us=1) == [0]
                assert t.instance(0)["clears"] >= 2     # at start, at reset
            finally:
                await agent.stop()
        asyncio.run(asyncio.wait_for(main(), 60))


def test_kv_drop_fault_is_replayed():
    """The simulator's fault `kv_drop` skips sequence numbers on the wire;
    the agent replays them and the index still equals the engine's cache."""
    with sim() as cluster:
        url = cluster.decode_urls[0]

        async def main():
            sink = ListSink()
            addr, agent = agent_for(cluster, sink, metrics_interval=0, health_interval=0)
            await agent.start()
            try:
                inst = agent.instances[0]
                await until(lambda: inst.mode == "precise", what="precise")
                await in_thread(post, url + "/sim/fault", {"mode": "kv_drop", "rate": 0.5})
                for k in range(12):
                    await in_thread(post, url + "/v1/completions",
                                    {"prompt": list(range(90 * k + 1, 90 * k + 49)),
                                     "max_tokens": 1})
                await in_thread(post, url + "/sim/fault", {"mode": "none"})
                await in_thread(post, url + "/v1/completions",
                                {"prompt": [7] * 32, "max_tokens": 1})
                n = await in_thread(published, url)
                await until(lambda: inst.streams[0].next == n, what="all events")
                dropped = (await in_thread(get_json, url + "/sim/stats"))[
                    "instance"]["kv_events"]["dropped"]
                assert dropped > 0 and inst.streams[0].gaps > 0
                assert inst.streams[0].resyncs == 0 and inst.mode == "precise"
                await agent.flush()
                ix = PrefixIndex(1, 16, 1000)
                t = IngestTarget(ix, {addr: 0})
                for b in sink.batches:
                    t.apply(b.encode(), now_us=1)
                truth = (await in_thread(get_json, url + "/sim/cache"))["hashes"]
                assert ix.stats()["precise"] == len(truth)
            finally:
                await agent.stop()
        asyncio.run(asyncio.wait_for(main(), 60))


# ---- configuration and the command line ------------------------------------------------

def test_read_nginx_conf_servers_of_balanced_upstreams():
    text = """
    http {
        omni_block_size 32;   # the index's
        upstream omni_prefill {
            omni_balance prefill;
            server 127.0.0.1:8001 max_fails=3;
            server 127.0.0.1:8002;
            keepalive 8;
        }
        upstream plain { server 10.0.0.1:80; }
        upstream omni_decode { omni_balance decode; server 127.0.0.1:9001; }
        server { listen 8080; location / { proxy_pass http://omni_decode; } }
    }"""
    assert read_nginx_conf(text) == (
        ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:9001"], 32)
    with pytest.raises(AgentConfigError):
        read_nginx_conf("upstream x { omni_balance prefill;")


def test_build_specs_options():
    s = build_specs(["h:8000"], kv_port_offset=100, replay_port_offset=200, dp_ranks=2)
    assert [(p.endpoint, p.replay, p.rank) for p in s[0].publishers] == [
        ("tcp://h:8100", "tcp://h:8200", 0), ("tcp://h:8101", "tcp://h:8201", 1)]
    s = build_specs(["h:8000"], kv_endpoints=["h:8000=ipc:///tmp/x,tcp://h:1"])
    assert (s[0].publishers[0].endpoint, s[0].publishers[0].replay) == ("ipc:///tmp/x", "tcp://h:1")
    for kw in ({"kv_endpoints": ["nope:1=tcp://a:1"]}, {"kv_endpoints": ["h:8000"]},
               {"dp_ranks": 0}, {"kv_port": 1, "kv_port_offset": 1}):
        with pytest.raises(AgentConfigError):
            build_specs(["h:8000"], **kw)


def test_cli_reads_gen_conf_output_and_dumps(tmp_path):
    with sim() as cluster:
        url = cluster.decode_urls[0]
        addr = cluster.decode_endpoints[0]
        conf = tmp_path / "nginx.conf"
        r = CliRunner().invoke(main, [
            "gen-conf", "--nginx-conf-file", str(conf), "--prefill-endpoints", addr,
            "--decode-endpoints", addr, "--core-num", "1", "--start-core-index", "0",
            "--listen-port", "18080", "--pd-policy", "sequential", "--block-size", "64"],
            catch_exceptions=False, env={"OMNI_CPU_COUNT": "2"})
        assert r.exit_code == 0, r.output
        assert read_nginx_conf(conf.read_text()) == ([addr], 64)
        dump = tmp_path / "batches.bin"
        status = tmp_path / "status.json"
        sport = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "omni_ctl.cli", "agent", "--conf", str(conf),
             "--kv-events-port-offset", "100", "--kv-replay-port-offset", "200",
             "--metrics-interval", "0.2", "--health-interval", "0.2",
             "--dump", str(dump), "--status-file", str(status), "--duration", "60",
             "--status-listen", f"127.0.0.1:{sport}"],
            stderr=subprocess.PIPE, env=os.environ.copy())
        try:
            p = list(range(3, 3 + 200))     # 12 engine blocks, 3 index blocks
            deadline = time.monotonic() + 30
            found = False
            while not found and time.monotonic() < deadline:
                post(url + "/v1/completions", {"prompt": p, "max_tokens": 1})
                time.sleep(0.2)
                if dump.exists():
                    ix = PrefixIndex(1, 64, 1000)
                    t = IngestTarget(ix, {addr: 0})
                    data = dump.read_bytes()
                    for b in split_batches(data[:_whole(data)]):
                        t.apply(b, now_us=1)
                    found = ix.match(p, now_us=1) == [3] and t.instance(0)["capacity_tokens"]
            assert found, "the dump never held the prompt's blocks and a scrape"
            deadline = time.monotonic() + 20
            while True:
                live = get_json(f"http://127.0.0.1:{sport}/status")["instances"][0]
                if live["health"] == "up" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert live["name"] == addr and live["events"] > 0 and live["health"] == "up"
            from prometheus_client.parser import text_string_to_metric_families
            with urllib.request.urlopen(f"http://127.0.0.1:{sport}/metrics", timeout=10) as r:
                fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
            ev = [x for x in fams["omni_agent_events"].samples if x.name.endswith("_total")]
            assert ev[0].labels == {"instance": addr} and ev[0].value > 0
            assert fams["omni_agent_precise"].samples[0].value == 1.0
            assert fams["omni_agent_health_up"].samples[0].value == 1.0
        finally:
            proc.send_signal(2)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        st = json.loads(status.read_text())["instances"]
        assert [i["name"] for i in st] == [addr]
        assert st[0]["events"] > 0 and st[0]["mode"] == "precise"


def _whole(data):
    """Length of the complete batches at the start of a dump being written."""
    pos = 0
    while len(data) - pos >= B.HEADER.size:
        total = B.HEADER.unpack_from(data, pos)[3]
        if pos + total > len(data):
            break
        pos += total
    return pos


def test_cli_rejects_bad_options(tmp_path):
    r = CliRunner().invoke(main, ["agent", "--dump", str(tmp_path / "d")])
    assert r.exit_code != 0 and "--conf" in r.output
    r = CliRunner().invoke(main, ["agent", "--instance", "h:1"])
    assert r.exit_code != 0 and "--push" in r.output
    r = CliRunner().invoke(main, ["agent", "--instance", "nocolon", "--dump", "x"])
    assert r.exit_code != 0 and "host:port" in r.output
    r = CliRunner().invoke(main, ["agent", "--instance", "h:1", "--dump", "x",
                                  "--fall", "0"])
    assert r.exit_code != 0 and "--fall" in r.output
    r = CliRunner().invoke(main, ["agent", "--instance", "h:1", "--dump", "x",
                                  "--status-listen", "0.0.0.0:9"])
    assert r.exit_code != 0 and "--status-listen" in r.output
    for opt in ("--flush-interval", "--idle-check"):
        r = CliRunner().invoke(main, ["agent", "--instance", "h:1", "--dump", "x", opt, "0"])
        assert r.exit_code != 0 and opt in r.output and "must be > 0" in r.output
