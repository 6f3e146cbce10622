"""Measure the simulator itself (docs/bench-notes/sim.md, docs/simulator.md).

    python -m omni_ctl.sim.selfbench stream --url URL [--concurrency 64] [--max-tokens 256] [--duration 10]
    python -m omni_ctl.sim.selfbench unary  --url URL [--concurrency 64] [--duration 10]
    python -m omni_ctl.sim.selfbench reproduce [--preset llama3-8b-h100]

`reproduce` starts its own one-instance cluster and replays vLLM's published
latency benchmark shape (a batch of 8 prompts, 32 input and 128 output tokens
each, all sent at once) and prints the mean end-to-end latency.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time

import aiohttp

# vLLM performance benchmark (buildkite vllm/performance-benchmark, "Latency
# tests", latency_llama8B_tp1 on H100, vLLM CI): batch 8, 32 in, 128 out.
PUBLISHED = {"llama3-8b-h100": {"figure_ms": 997.542, "batch": 8, "input": 32, "output": 128}}


async def _stream_one(session, url, max_tokens, i):
    body = {"prompt": f"stream request {i} " * 4, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    n = 0
    async with session.post(url, json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                n += 1
    return n


async def _unary_one(session, url, i):
    body = {"prompt": f"hello world, a short prompt {i % 97}", "max_tokens": 4}
    async with session.post(url, json=body) as r:
        await r.read()
        return r.status


async def _run_for(duration, concurrency, one):
    stop = time.monotonic() + duration
    counts = []

    async def worker(w):
        i = w
        while time.monotonic() < stop:
            counts.append(await one(i))
            i += concurrency
    t0 = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return counts, time.monotonic() - t0


async def stream(url, concurrency, max_tokens, duration):
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        counts, dt = await _run_for(duration, concurrency,
                                    lambda i: _stream_one(s, url, max_tokens, i))
    toks = sum(counts)
    return {"mode": "stream", "requests": len(counts), "tokens": toks,
            "seconds": round(dt, 2), "tokens_per_s": round(toks / dt, 1)}


async def unary(url, concurrency, duration):
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        codes, dt = await _run_for(duration, concurrency, lambda i: _unary_one(s, url, i))
    ok = sum(1 for c in codes if c == 200)
    return {"mode": "unary", "requests": len(codes), "ok": ok, "seconds": round(dt, 2),
            "requests_per_s": round(ok / dt, 1)}


async def _batch_latency(url, batch, inp, out):
    async with aiohttp.ClientSession() as s:
        async def one(i):
            prompt = [1000 + 37 * i + k for k in range(inp)]
            t0 = time.monotonic()
            async with s.post(url, json={"prompt": prompt, "max_tokens": out,
                                         "ignore_eos": True}) as r:
                data = await r.json()
            assert data["usage"]["completion_tokens"] == out, data
            return time.monotonic() - t0
        t0 = time.monotonic()
        lat = await asyncio.gather(*(one(i) for i in range(batch)))
        return time.monotonic() - t0, lat


def reproduce(preset, runs=5):
    from .cluster import SimCluster

    ref = PUBLISHED[preset]
    with SimCluster(prefill=0, decode=1, preset=preset, args=["--no-uvloop"]) as sim:
        url = sim.decode_urls[0] + "/v1/completions"
        walls = []
        for _ in range(runs):
            wall, _ = asyncio.run(_batch_latency(url, ref["batch"], ref["input"], ref["output"]))
            walls.append(wall * 1000.0)
    got = statistics.mean(walls)
    return {"preset": preset, "published_ms": ref["figure_ms"], "simulated_ms": round(got, 1),
            "runs_ms": [round(w, 1) for w in walls],
            "error_pct": round(100.0 * (got - ref["figure_ms"]) / ref["figure_ms"], 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m omni_ctl.sim.selfbench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("stream")
    a.add_argument("--url", required=True)
    a.add_argument("--concurrency", type=int, default=64)
    a.add_argument("--max-tokens", type=int, default=256)
    a.add_argument("--duration", type=float, default=10.0)
    b = sub.add_parser("unary")
    b.add_argument("--url", required=True)
    b.add_argument("--concurrency", type=int, default=64)
    b.add_argument("--duration", type=float, default=10.0)
    c = sub.add_parser("reproduce")
    c.add_argument("--preset", default="llama3-8b-h100", choices=sorted(PUBLISHED))
    c.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    if args.cmd == "stream":
        res = asyncio.run(stream(args.url, args.concurrency, args.max_tokens, args.duration))
    elif args.cmd == "unary":
        res = asyncio.run(unary(args.url, args.concurrency, args.duration))
    else:
        res = reproduce(args.preset, args.runs)
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
