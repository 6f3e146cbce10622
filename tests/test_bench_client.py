"""`omni-ctl bench` against a scripted backend whose timings are known.

The backend is a small aiohttp server in a thread. Request number i (taken from
the X-Request-Id the client sends, `<run>-<i>`) follows SCRIPT[i]: when to send
the first token, the gaps after it, and how to fail. The client's numbers must
match the script within what real timers on a busy machine allow.
"""

import asyncio
import json
import socket
import threading

import pytest
from aiohttp import web

from omni_ctl.bench import client, core
from omni_ctl.bench.metrics import parse_slo, summarize

# Timer tolerance: event-loop wake-ups and a shared 2-core machine.
TOL_MS = 25.0


class ScriptedBackend:
    """Serves /v1/completions and /v1/chat/completions from a script."""

    def __init__(self, script):
        self.script = script
        self.bodies = {}
        self.loop = asyncio.new_event_loop()
        self.port = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10), "scripted backend did not start"
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.closing.set)
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        self.closing = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_get("/v1/models", self.models)
        self._runner = web.AppRunner(app)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "scripted"}]})

    async def handle(self, request):
        body = await request.json()
        idx = int(request.headers["X-Request-Id"].rsplit("-", 1)[1])
        self.bodies[idx] = body
        step = self.script[idx % len(self.script)]
        chat = request.path.endswith("/chat/completions")
        kind = step.get("kind", "ok")
        if kind == "http":
            return web.json_response(
                {"error": {"message": "overloaded", "type": "server_error",
                           "code": step["status"]}}, status=step["status"])
        if kind == "hang":       # until the test ends
            await self.closing.wait()
            return web.Response(status=500)
        if not body.get("stream"):
            await asyncio.sleep(step["ttft"])
            n = len(step["gaps"]) + 1
            text = "".join(f"t{i} " for i in range(n))
            msg = {"message": {"role": "assistant", "content": text}} if chat \
                else {"text": text}
            return web.json_response({"choices": [dict(index=0, **msg)],
                                      "usage": {"prompt_tokens": 5,
                                                "completion_tokens": n}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(obj):
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        def piece(t):
            if chat:
                return {"choices": [{"index": 0, "delta": {"content": t}}]}
            return {"choices": [{"index": 0, "text": t}]}

        if chat:   # a role-only first chunk carries no token
            await event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        await asyncio.sleep(step["ttft"])
        await event(piece("t0 "))
        for i, gap in enumerate(step["gaps"], 1):
            await asyncio.sleep(gap)
            if kind == "stream_error" and i == step["fail_at"]:
                await event({"error": {"message": "engine died", "code": 500}})
                return resp
            if kind == "disconnect" and i == step["fail_at"]:
                request.transport.close()
                return resp
            await event(piece(f"t{i} "))
        if step.get("usage", True):
            await event({"choices": [], "usage": {
                "prompt_tokens": 7, "completion_tokens": len(step["gaps"]) + 1}})
        if kind != "no_done":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _run(url, sessions, **kw):
    cfg = client.BenchConfig(target=url, progress=False,
                             **{"concurrency": 1, **kw})
    return client.run(cfg, sessions)


def _sessions(n, endpoint="completions", **spec):
    return core.make_workload(core.WorkloadSpec(
        workload="random", num_requests=n, endpoint=endpoint,
        random_input_len=16, random_output_len=4, **spec))


def _timing_misses(res, script):
    """How the client's timings of a scripted run differ from the script by
    more than the timers allow (empty: they match)."""
    miss = []

    def near(what, got, want, tol=TOL_MS):
        if abs(got - want) > tol:
            miss.append(f"request {r.index}: {what} {got:.1f} ms, script {want:.1f}")

    for r in res.records:
        step = script[r.index % 2]
        gaps_ms = [g * 1000 for g in step["gaps"]]
        near("TTFT", r.ttft_ms, step["ttft"] * 1000)
        for k, (got, want) in enumerate(zip(r.itl_ms, gaps_ms)):
            near(f"ITL {k}", got, want)
        near("E2E", r.e2e_ms, (step["ttft"] + sum(step["gaps"])) * 1000, 2 * TOL_MS)
        near("TPOT", r.tpot_ms, sum(gaps_ms) / len(gaps_ms))
    s = summarize(res.records, res.duration_s, {})
    if abs(s["ttft_ms"]["mean"] - 125) > TOL_MS:
        miss.append(f"mean TTFT {s['ttft_ms']['mean']:.1f} ms, script 125")
    return miss


def test_stream_metrics_match_the_script():
    """The client's TTFT, ITLs, E2E and TPOT match the script's timings.  A
    timing that misses by more than the tolerance is run again, up to three
    times in all: the client and the scripted backend share one process and
    the machine's two cores with whatever else runs (a CI run under the
    sanitizers once saw a first token 105 ms late), and a stall of the
    process is no error of the client's; an error of the client's misses
    every time.  What is not timing is checked on every run."""
    script = [
        {"ttft": 0.20, "gaps": [0.05, 0.05, 0.05]},             # TPOT 50 ms
        {"ttft": 0.05, "gaps": [0.10, 0.02, 0.15, 0.03]},       # uneven ITL
    ]
    tries = []
    for _ in range(3):
        with ScriptedBackend(script) as be:
            res = _run(be.url, _sessions(4))
        assert [r.ok for r in res.records] == [True] * 4
        for r in res.records:
            gaps = script[r.index % 2]["gaps"]
            assert len(r.itl_ms) == len(gaps)
            assert r.output_tokens == len(gaps) + 1 and r.output_tokens_from == "usage"
            assert r.prompt_tokens == 7
            # TPOT is (E2E - TTFT) / (tokens - 1), exactly, from the same record
            assert r.tpot_ms == pytest.approx((r.e2e_ms - r.ttft_ms) / (r.output_tokens - 1))
        s = summarize(res.records, res.duration_s, {})
        assert s["requests"] == s["completed"] == 4 and s["errors"] == 0
        assert s["itl_ms"]["count"] == 3 + 4 + 3 + 4
        assert s["total_output_tokens"] == 18
        assert s["output_token_throughput"] == pytest.approx(18 / res.duration_s)
        assert s["request_throughput"] == pytest.approx(4 / res.duration_s)
        # closed loop, one at a time: the run lasts the sum of the E2Es
        assert res.duration_s * 1000 == pytest.approx(
            sum(r.e2e_ms for r in res.records), abs=4 * TOL_MS)
        tries.append(_timing_misses(res, script))
        if not tries[-1]:
            break
    assert not tries[-1], tries


def test_goodput_counts_requests_within_every_slo():
    # TTFT 50 or 400 ms; TPOT 20 or 120 ms: one of four meets both SLOs
    script = [
        {"ttft": 0.05, "gaps": [0.02, 0.02]},
        {"ttft": 0.40, "gaps": [0.02, 0.02]},
        {"ttft": 0.05, "gaps": [0.12, 0.12]},
        {"ttft": 0.40, "gaps": [0.12, 0.12]},
    ]
    with ScriptedBackend(script) as be:
        res = _run(be.url, _sessions(8))
    slo = parse_slo("ttft=200ms,tpot=0.07s")
    s = summarize(res.records, res.duration_s, slo)
    assert s["good_requests"] == 2
    assert s["goodput"] == pytest.approx(2 / res.duration_s)
    assert s["slo_attainment"] == pytest.approx(0.25)
    assert s["slo"] == {"ttft_ms": 200.0, "tpot_ms": 70.0}
    only_ttft = summarize(res.records, res.duration_s, parse_slo("ttft=200ms"))
    assert only_ttft["good_requests"] == 4
    none = summarize(res.records, res.duration_s, {})
    assert none["goodput"] == pytest.approx(none["request_throughput"])


def test_chat_role_chunk_is_not_the_first_token_and_tokens_counted_without_usage():
    script = [{"ttft": 0.15, "gaps": [0.03, 0.03], "usage": False}]
    with ScriptedBackend(script) as be:
        res = _run(be.url, _sessions(2, endpoint="chat"), endpoint="chat")
    for r in res.records:
        assert r.ok
        assert r.ttft_ms == pytest.approx(150, abs=TOL_MS)
        assert r.output_tokens == 3 and r.output_tokens_from == "chunks"
        assert r.text == "t0 t1 t2 "


def test_non_stream_ttft_equals_e2e():
    script = [{"ttft": 0.1, "gaps": [0, 0, 0]}]
    with ScriptedBackend(script) as be:
        res = _run(be.url, _sessions(2), stream=False)
    for r in res.records:
        assert r.ok and r.output_tokens == 4 and r.itl_ms == []
        assert r.ttft_ms == pytest.approx(r.e2e_ms, abs=1.0)
        assert r.ttft_ms == pytest.approx(100, abs=TOL_MS)
    assert "stream_options" not in be.bodies[0]


def test_every_request_is_accounted_with_its_error_kind():
    script = [
        {"ttft": 0.01, "gaps": [0.01]},
        {"kind": "http", "status": 503},
        {"kind": "http", "status": 429},
        {"kind": "stream_error", "ttft": 0.01, "gaps": [0.01, 0.01], "fail_at": 2},
        {"kind": "disconnect", "ttft": 0.01, "gaps": [0.01, 0.01], "fail_at": 2},
        {"kind": "no_done", "ttft": 0.01, "gaps": [0.01]},
        {"kind": "hang"},
    ]
    with ScriptedBackend(script) as be:
        res = _run(be.url, _sessions(7), concurrency=7, request_timeout_s=1.0)
    s = summarize(res.records, res.duration_s, {})
    assert s["requests"] == 7 and s["completed"] == 1 and s["errors"] == 6
    assert s["error_kinds"] == {"http_503": 1, "http_429": 1, "stream_error": 1,
                                "disconnect": 1, "incomplete_stream": 1, "timeout": 1}
    by_idx = {r.index: r for r in res.records}
    assert by_idx[1].error == "overloaded" and by_idx[1].http_status == 503
    assert by_idx[3].error == "engine died"
    # failed requests are left out of the latency statistics
    assert s["ttft_ms"]["count"] == 1


def test_hard_stop_cancels_and_counts_what_is_left():
    script = [{"kind": "hang"}]
    with ScriptedBackend(script) as be:
        res = _run(be.url, _sessions(10), concurrency=3, max_duration_s=0.8)
    assert res.stopped_early
    assert res.duration_s == pytest.approx(0.8, abs=0.3)
    s = summarize(res.records, res.duration_s, {}, res.not_sent)
    assert s["requests"] == 3 and s["error_kinds"] == {"cancelled": 3}
    assert s["not_sent"] == 7 and s["requests"] + s["not_sent"] == 10


def test_unreachable_target_is_connect_errors():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]        # bound, never listening
        res = _run(f"http://127.0.0.1:{port}", _sessions(3), concurrency=2)
    assert [r.error_kind for r in res.records] == ["connect"] * 3


def test_open_loop_poisson_sends_on_time_and_is_seeded():
    script = [{"ttft": 0.3, "gaps": [0.01]}]   # slower than the arrivals
    with ScriptedBackend(script) as be:
        res = _run(be.url, _sessions(20), concurrency=None, rate=40.0, seed=3)
    runner = client.Runner(client.BenchConfig(target="x", rate=40.0, seed=3),
                           _sessions(20))
    due = runner.arrivals()
    assert due == client.Runner(client.BenchConfig(target="x", rate=40.0, seed=3),
                                _sessions(20)).arrivals()
    assert due[-1] == pytest.approx(20 / 40.0, rel=0.6)
    # open loop: later requests are sent while earlier ones still run
    starts = sorted(r.start_s for r in res.records)
    assert starts[-1] < 0.3 + due[-1]
    # sent when due (generous: the event loop shares 2 busy cores)
    lags = [r.start_s - r.scheduled_s for r in res.records]
    assert min(lags) >= 0 and max(lags) < 0.25
    assert all(r.ok for r in res.records)


def test_trace_times_replayed_with_speedup(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(
        {"timestamp": ts, "input_length": 600, "output_length": 2,
         "hash_ids": [1, 2]}) + "\n" for ts in (1000, 1400, 2200)))
    spec = core.WorkloadSpec(workload=f"trace:{trace}", speedup=4.0)
    mode = core.arrival_mode(spec, None, None)
    assert mode["use_arrival_times"]
    with ScriptedBackend([{"ttft": 0.01, "gaps": [0.01]}]) as be:
        cfg = client.BenchConfig(target=be.url, progress=False, **mode)
        res = client.run(cfg, core.make_workload(spec))
        bodies = be.bodies
    starts = [r.start_s for r in sorted(res.records, key=lambda r: r.index)]
    for got, want in zip(starts, (0.0, 0.1, 0.3)):
        assert got == pytest.approx(want, abs=0.03)
    # token-id prompt, exact output length
    assert len(bodies[0]["prompt"]) == 600
    assert bodies[0]["max_tokens"] == bodies[0]["min_tokens"] == 2
    assert bodies[0]["ignore_eos"] is True
    assert bodies[0]["stream_options"] == {"include_usage": True}


def test_multiturn_resends_the_growing_history():
    with ScriptedBackend([{"ttft": 0.01, "gaps": [0.01]}]) as be:
        spec = core.WorkloadSpec(workload="multiturn", num_requests=6, mt_turns=3,
                                 endpoint="chat", mt_system_len=10, mt_user_len=5)
        res = client.run(client.BenchConfig(target=be.url, endpoint="chat",
                                            concurrency=2, progress=False),
                         core.make_workload(spec))
        bodies = be.bodies
    assert all(r.ok for r in res.records) and len(res.records) == 6
    by_session = {}
    for r in res.records:
        by_session.setdefault(r.session, []).append(bodies[r.index]["messages"])
    assert len(by_session) == 2
    for turns in by_session.values():
        assert [len(m) for m in turns] == [2, 4, 6]    # system + user, then +2 each
        for prev, cur in zip(turns, turns[1:]):
            assert cur[:len(prev)] == prev             # history resent unchanged
            assert cur[len(prev)] == {"role": "assistant", "content": "t0 t1 "}


def test_bench_command_writes_summary_table_and_plots(tmp_path):
    from click.testing import CliRunner
    from omni_ctl.bench.cli import bench
    out = tmp_path / "out"
    with ScriptedBackend([{"ttft": 0.02, "gaps": [0.01, 0.01]}]) as be:
        result = CliRunner().invoke(bench, [
            "--target", be.url, "--workload", "gsp", "--gsp-groups", "2",
            "--gsp-prompts-per-group", "3", "--gsp-system-len", "50",
            "--gsp-question-len", "5", "--gsp-output-len", "3", "--concurrency", "4",
            "--slo", "ttft=1s", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    for key in ("requests", "errors", "duration_s", "request_throughput",
                "output_token_throughput", "goodput", "prefix_cache_hit_rate"):
        assert key in s
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(s[key]) >= {"mean", "p50", "p90", "p99"}
    assert s["requests"] == 6 and s["errors"] == 0
    assert s["config"]["model"] == "scripted"
    assert len((out / "requests.jsonl").read_text().splitlines()) == 6
    for png in ("ttft_cdf.png", "latency_over_time.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| TTFT (ms) |" in result.output


def test_bench_command_rejects_bad_slo():
    from click.testing import CliRunner
    from omni_ctl.bench.cli import bench
    result = CliRunner().invoke(bench, ["--target", "http://127.0.0.1:9",
                                        "--slo", "ttft=2x"])
    assert result.exit_code != 0
    assert "ttft=2x" in result.output
