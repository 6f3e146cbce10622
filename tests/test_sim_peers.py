"""Peer routers (vllm-router, sglang-router) drive the simulator in P/D mode."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from omni_ctl.sim.cluster import SimCluster

pytestmark = pytest.mark.timeout(90)

BIN = os.path.dirname(sys.executable)


def _binary(name):
    path = os.path.join(BIN, name)
    if os.access(path, os.X_OK):
        return path
    return shutil.which(name)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=10.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read().decode()


class Router:
    """A peer router subprocess, stopped by pid."""

    def __init__(self, argv):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, url, body, timeout=40.0):
        """Until a real request succeeds (routers answer /health before they
        have registered their workers)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                st, text = _post(url, body, timeout=5)
                if st == 200:
                    return
                last = text
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                last = exc
            time.sleep(0.2)
        pytest.fail(f"router not ready: {last!r}\n{self.output()}")

    def output(self):
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _exercise(base, sim, kind):
    body = {"model": "sim-model", "prompt": "routed through a peer " * 8, "max_tokens": 5,
            "ignore_eos": True}
    st, text = _post(base + "/v1/completions", body)
    data = json.loads(text)
    assert st == 200 and data["usage"]["completion_tokens"] == 5
    req = urllib.request.Request(base + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps(dict(body, stream=True, stream_options={
                                     "include_usage": True})).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        raw = r.read().decode()
    events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    tokens = [json.loads(e) for e in events[:-1]]
    assert sum(1 for t in tokens if t.get("choices")) == 5
    st, text = _post(base + "/v1/chat/completions", {
        "model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert st == 200 and json.loads(text)["usage"]["completion_tokens"] == 3
    cluster = sim.stats(requests=20)["cluster"]
    pre = [i for i in cluster if i["role"] == "prefill"]
    dec = [i for i in cluster if i["role"] == "decode"]
    # the prefill tier prefilled, the decode tier got its KV from it
    assert sum(i["requests_finished"] for i in pre) >= 3
    assert all(r["kind"] == kind for i in dec for r in i["requests"])
    assert sum(i["errors_total"] for i in cluster) == 0
    for i in cluster:
        assert i["waiting"] == 0 and i["running"] == 0


def test_vllm_router_pd():
    exe = _binary("vllm-router")
    if exe is None:
        pytest.skip("vllm-router is not installed (pip install '.[peers]')")
    with SimCluster(prefill=2, decode=2, preset="tiny", args=["--hash-seed", "1"]) as sim:
        port = _free_port()
        argv = [exe, "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation",
                "--prefill-policy", "cache_aware", "--decode-policy", "round_robin",
                "--prometheus-port", str(_free_port()), "--log-level", "error"]
        for u in sim.prefill_urls:
            argv += ["--prefill", u]
        for u in sim.decode_urls:
            argv += ["--decode", u]
        router = Router(argv)
        try:
            base = f"http://127.0.0.1:{port}"
            router.wait_ready(base + "/v1/completions",
                              {"model": "sim-model", "prompt": "warm", "max_tokens": 1})
            _exercise(base, sim, "kv_consumer")
            assert sum(i["kv_pulls_served"] for i in sim.stats()["cluster"]) >= 4
        finally:
            router.stop()


def test_sglang_router_pd():
    exe = _binary("sglang-router")
    if exe is None:
        pytest.skip("sglang-router is not installed (pip install '.[peers]')")
    with SimCluster(prefill=2, decode=2, engine="sglang", preset="tiny",
                    args=["--hash-seed", "1"]) as sim:
        port = _free_port()
        argv = [exe, "launch", "--host", "127.0.0.1", "--port", str(port), "--pd-disaggregation",
                "--prefill-policy", "cache_aware", "--decode-policy", "round_robin",
                "--disable-health-check", "--prometheus-port", str(_free_port()),
                "--log-level", "error"]
        for ep in sim.prefill_endpoints:
            host_port, boot = ep.split("@")
            argv += ["--prefill", "http://" + host_port, boot]
        for u in sim.decode_urls:
            argv += ["--decode", u]
        router = Router(argv)
        try:
            base = f"http://127.0.0.1:{port}"
            router.wait_ready(base + "/v1/completions",
                              {"model": "sim-model", "prompt": "warm", "max_tokens": 1})
            _exercise(base, sim, "boot_decode")
            st, text = _post(base + "/generate", {"text": "native api",
                                                  "sampling_params": {"max_new_tokens": 4}})
            assert st == 200 and json.loads(text)["meta_info"]["completion_tokens"] == 4
        finally:
            router.stop()
