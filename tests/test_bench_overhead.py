"""`omni-ctl bench-overhead`: wrk parsing, request bodies, the plain nginx
template, and a short real run against the canned backend."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from omni_ctl import procfs
from omni_ctl.bench import overhead, procs
from omni_ctl.bench.errors import BenchError
from tokmodel import model_dir  # noqa: F401 (fixture)

WRK_OUTPUT = """Running 3s test @ http://127.0.0.1:31901/v1/completions
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   276.79us  186.71us   6.35ms   98.51%
    Req/Sec   116.80k    15.38k  129.10k    76.67%
  Latency Distribution
     50%  248.00us
     75%  270.00us
     90%    1.57ms
     99%    1.02s
  347508 requests in 3.00s, 192.22MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 17
Requests/sec: 115774.45
Transfer/sec:     64.04MB
"""


def test_parse_wrk():
    r = overhead.parse_wrk(WRK_OUTPUT)
    assert r["rps"] == 115774.45 and r["requests"] == 347508
    assert r["p50_ms"] == pytest.approx(0.248) and r["p90_ms"] == pytest.approx(1.57)
    assert r["p99_ms"] == pytest.approx(1020.0)
    assert r["non_2xx"] == 17 and r["socket_errors"] == 5
    with pytest.raises(BenchError, match="no Requests/sec"):
        overhead.parse_wrk("unable to connect")


@pytest.mark.parametrize("size", [1024, 16 * 1024, 200 * 1024])
def test_bodies_have_the_requested_size(size):
    body = overhead.make_body(size)
    assert len(body) == size
    obj = json.loads(body)
    assert obj["stream"] is False and isinstance(obj["prompt"], str)
    tokens = overhead.make_body(size, "tokens")
    assert size - 8 <= len(tokens) <= size
    assert all(isinstance(t, int) for t in json.loads(tokens)["prompt"])


def test_sizes_and_targets_parsing():
    assert overhead.parse_sizes("1k, 16K,200k,80") == [1024, 16384, 204800, 80]
    with pytest.raises(BenchError, match="'16q'"):
        overhead.parse_sizes("1k,16q")
    assert overhead.parse_targets(None) == list(overhead.TARGETS)
    with pytest.raises(BenchError, match="unknown 'haproxy'"):
        overhead.parse_targets("nginx,haproxy")


def test_peer_command_lines_follow_peers_md():
    urls = [f"http://127.0.0.1:{p}" for p in (1, 2, 3, 4)]
    v = overhead.peer_argv("vllm-router-pd", "vllm-router", 9, urls)
    assert v[v.index("--prefill-policy") + 1] == "cache_aware"
    assert "--vllm-pd-disaggregation" in v and v.count("--prefill") == 2
    s = overhead.peer_argv("sglang-router-pd", "sglang-router", 9, urls)
    assert s[1] == "launch" and "--pd-disaggregation" in s
    assert s[s.index("--prefill") + 1:s.index("--prefill") + 3] == [urls[0], "8998"]
    assert s[s.index("--host") + 1] == "127.0.0.1"
    for argv in (v, s):      # their metrics exporters: loopback, not the fixed 29000
        assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"
        assert argv[argv.index("--prometheus-port") + 1] != "29000"
    rr = overhead.peer_argv("vllm-router-rr", "vllm-router", 9, urls)
    assert rr[rr.index("--worker-urls") + 1:rr.index("--worker-urls") + 3] == urls[:2]
    assert rr[rr.index("--policy") + 1] == "round_robin"


def test_the_cli_help_names_every_target():
    # the list is spelled out in the CLI so that `omni-ctl` starts without
    # importing the benchmark; it must stay the benchmark's
    from click.testing import CliRunner
    from omni_ctl.bench.cli import bench_overhead
    text = " ".join(CliRunner().invoke(bench_overhead, ["--help"]).output.split())
    listed = re.search(r"all available\): (.*?)\s+--duration", text).group(1)
    names = [t.strip() for t in listed.replace("- ", "-").split(",")]
    assert sorted(names) == sorted(overhead.TARGETS)


def test_mirror_sends_each_request_whole_to_both_upstreams(tmp_path):
    """nginx-mirror, the two-leg floor of the overhead bench: real nginx in
    front of two recording HTTP servers."""
    import http.server
    import threading
    import urllib.request

    got = {"a": [], "b": []}

    def server(name):
        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got[name].append((self.path, body))
                out = name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    a, b = server("a"), server("b")
    port = procs.free_ports(1)[0]
    prefix = str(tmp_path / "m")
    conf = procs.render_plain_nginx(prefix, [port], mode="proxy",
                                    upstreams=[f"127.0.0.1:{a.server_port}"],
                                    mirror=[f"127.0.0.1:{b.server_port}"])
    proc = procs.start_nginx("nginx-mirror", conf, prefix)
    try:
        body = overhead.make_body(16 * 1024)
        url = f"http://127.0.0.1:{port}/v1/completions"
        procs.wait_http(proc, url, body, timeout=15)
        req = urllib.request.Request(url, data=body, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.read() == b"a"          # the answer is the first leg's
        deadline = time.monotonic() + 10
        while len(got["b"]) < len(got["a"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(got["a"]) >= 2 and len(got["b"]) == len(got["a"])
        assert got["a"][-1] == ("/v1/completions", body) == got["b"][-1]
    finally:
        proc.stop()
        a.shutdown()
        b.shutdown()


def test_plain_nginx_template_renders_and_passes_nginx_t(tmp_path):
    prefix = str(tmp_path / "p")
    conf = procs.render_plain_nginx(prefix, [18081, 18082], mode="proxy", workers=2,
                                    upstreams=["127.0.0.1:9001", "127.0.0.1:9002"],
                                    start_core=0)
    text = open(conf).read()
    assert "server 127.0.0.1:9002;" in text and "keepalive 256;" in text
    assert "worker_cpu_affinity 1 10;" in text
    assert "listen 127.0.0.1:18082" in text and "0.0.0.0" not in text
    assert "{{" not in text and "{%" not in text
    for line in text.splitlines():       # every path inside the prefix
        for word in line.split():
            if word.startswith("/") and word != "/":
                assert word.startswith(prefix), line
    canned = procs.render_plain_nginx(str(tmp_path / "c"), [18083], mode="canned",
                                      canned_body=overhead.CANNED_BODY)
    assert overhead.CANNED_BODY in open(canned).read()
    for path, pre in ((conf, prefix), (canned, str(tmp_path / "c"))):
        res = subprocess.run([procs.nginx_binary(), "-t", "-p", pre, "-c", path],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    with pytest.raises(BenchError, match="canned body"):
        procs.render_plain_nginx(str(tmp_path / "d"), [1], mode="canned",
                                 canned_body="{'$x'}")
    with pytest.raises(BenchError, match="upstream"):
        procs.render_plain_nginx(str(tmp_path / "e"), [1], mode="proxy")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_short_overhead_run(tmp_path):
    logs = []
    res = overhead.run_overhead(sizes="1k", targets="direct,nginx", duration=1, repeat=2,
                                warmup=0, connections=4, out_dir=str(tmp_path),
                                log=logs.append)
    rows = {r["target"]: r for r in res["rows"]}
    for name in ("direct", "nginx"):
        assert rows[name]["rps"] > 100 and rows[name]["non_2xx"] == 0
        assert rows[name]["socket_errors"] == 0
        assert 0 < rows[name]["p50_ms"] <= rows[name]["p99_ms"]
    assert "| nginx |" in res["markdown"]
    # all targets up at once, measured in interleaved, rotated rounds
    assert [(r["round"], r["target"]) for r in res["runs"]] == [
        (0, "direct"), (0, "nginx"), (1, "nginx"), (1, "direct")]
    assert rows["nginx"]["rounds"] == 2
    assert rows["nginx"]["rps_min"] <= rows["nginx"]["rps"] <= rows["nginx"]["rps_max"]
    saved = json.load(open(tmp_path / "overhead.json"))
    assert saved["rows"] == res["rows"]
    assert not os.path.exists(saved.get("tmp_dir") or "/nonexistent")


def test_a_round_under_half_of_the_others_median_is_a_collapse():
    def runs(target, size, values):
        return [{"target": target, "size": size, "round": i, "rps": v}
                for i, v in enumerate(values)]
    rs = (runs("omni-parallel", 1024, [23000, 1394, 24000])
          + runs("nginx", 1024, [42000, 30000, 45000])        # noise, not a stall
          + runs("omni-parallel", 204800, [4145, 638, 788]))
    found = overhead.collapses(rs)
    assert [(c["target"], c["size"], c["round"]) for c in found] == [
        ("omni-parallel", 1024, 1), ("omni-parallel", 204800, 1),
        ("omni-parallel", 204800, 2)]
    text = overhead.markdown_overhead({"sizes": [1024], "duration_s": 1, "repeat": 3,
                                       "wrk_threads": 1, "connections": 1,
                                       "rows": [], "collapses": found[:1]})
    assert "**COLLAPSE**: omni-parallel 1 KB round 2: 1394 req/s" in text


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_tokenizing_target_in_a_short_run(tmp_path, model_dir):  # noqa: F811
    # omni-sequential-tok starts the tokenizer sidecar (real deepseek
    # tokenizer); the run reports what it tokenized and the engine-side cost
    logs = []
    res = overhead.run_overhead(sizes="1k,16k", targets="omni-sequential,omni-sequential-tok",
                                duration=1, repeat=1, warmup=0, connections=2,
                                out_dir=str(tmp_path), model_path=str(model_dir),
                                omni_args="--tokenize-max-inflight 7", keep_dir=True,
                                log=logs.append)
    rows = {(r["target"], r["size"]): r for r in res["rows"]}
    for key in [(t, s) for t in ("omni-sequential", "omni-sequential-tok")
                for s in (1024, 16384)]:
        assert rows[key]["rps"] > 0 and rows[key]["non_2xx"] == 0, rows[key]
    tok = {t["size"]: t for t in res["tokenize"]}
    assert set(tok) == {1024, 16384} and all(t["target"] == "omni-sequential-tok"
                                             for t in tok.values())
    assert tok[1024]["tokenized"] > 0, (tok, logs)
    # the sidecar was reachable from the workers all along
    assert tok[1024]["down"] == tok[16384]["down"] == 0, (tok, logs)
    eng = {e["size"]: e for e in res["engine_tokenize"]}
    assert set(eng) == {1024, 16384}
    assert 0 < eng[1024]["tokens"] < eng[16384]["tokens"]
    assert all(0 < e["p50_ms"] <= e["p99_ms"] for e in eng.values())
    assert "engine-side tokenization it replaces, 16 KB" in res["markdown"]
    assert "omni-sequential-tok 1 KB:" in res["markdown"]
    # --omni-args reach gen-conf: the proxies ran with them
    assert res["omni_args"] == ["--tokenize-max-inflight", "7"]
    for target in ("omni-sequential", "omni-sequential-tok"):
        conf = open(os.path.join(res["tmp_dir"], target, "nginx.conf")).read()
        assert "omni_tokenize_max_inflight 7;" in conf
    assert "gen-conf --tokenize-max-inflight 7" in res["markdown"]
    shutil.rmtree(res["tmp_dir"])


def test_the_tokenizing_target_needs_a_model_path(tmp_path):
    with pytest.raises(overhead.Skip, match="--model-path"):
        overhead.start_target("omni-sequential-tok", str(tmp_path), [1, 2, 3, 4], 1,
                              5, b"{}")


def _children(pid):
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and (procfs.ppid_state(int(e)) or (0,))[0] == pid]


def _running(pid):
    state = procfs.ppid_state(pid)
    return state is not None and state[1] not in ("Z", "X")


def test_sigterm_stops_what_the_bench_started(tmp_path):
    # a CI timeout or `kill PID` sends SIGTERM: the bench must stop the nginx
    # and wrk it started and remove its temp prefix, as on Ctrl-C, not die
    # and leave them running
    import queue
    import signal
    import sys
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "omni_ctl.cli", "bench-overhead", "--targets", "nginx",
         "--sizes", "1k", "--duration", "60", "--repeat", "1", "--connections", "2",
         "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 60, []
        while not any("[overhead] nginx: http" in x for x in seen):
            assert time.monotonic() < deadline, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
        # the load is running: backend, proxy and wrk are our children
        deadline = time.monotonic() + 20
        while len(kids := _children(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        prefixes = set()
        for pid in kids:
            # nginx rewrites its argv into one title string
            cmdline = " ".join(procfs.cmdline_args(pid))
            prefixes |= set(re.findall(r"(/\S*/omni-overhead-[^/\s]+)", cmdline))
        assert len(kids) >= 3 and len(prefixes) == 1, (kids, prefixes)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(_running(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in kids if _running(p)] == []
        assert not os.path.exists(prefixes.pop())
    finally:
        if proc.poll() is None:
            # a failed assertion above: let the bench clean up, then make sure
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
