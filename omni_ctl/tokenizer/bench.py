"""A micro-benchmark of the tokenizer service (for docs/benchmarks.md, run on
a quiet machine):

    python -m omni_ctl.tokenizer.bench --model-path DIR [--requests N] [--out FILE]

- by prompt size (1 KB, 16 KB, 200 KB of text): the service's round trip
  over its socket (HTTP, parse, encode, binary answer) against transformers'
  own encode in this process (what an engine spends tokenizing), p50/p99;
- multi-turn conversations (bench workload "multiturn"), each sent over one
  connection (one worker): time per request with the reuse cache and without.

Prints one JSON object per measurement and a table.  Counts and time are
bounded (--requests, --max-seconds per measurement).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click

from ..bench import workloads
from . import control

SIZES_KB = (1, 16, 200)


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _summary(name, times, **extra):
    return dict(extra, name=name, n=len(times), p50_ms=_pct(times, 0.5) * 1e3,
                p99_ms=_pct(times, 0.99) * 1e3, mean_ms=statistics.fmean(times) * 1e3)


def _timed(fn, requests, max_seconds):
    times, deadline = [], time.monotonic() + max_seconds
    while len(times) < requests and time.monotonic() < deadline:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _post(conn, route, body):
    conn.request("POST", route, body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise click.ClickException(f"the service answered {r.status}: {data[:200]!r}")
    return data


def by_size(svc, model_path, requests, max_seconds):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    conn = control._UnixHTTP(svc.socket, 60)
    out = []
    try:
        for kb in SIZES_KB:
            # about 5 characters per word of the bench vocabulary
            text = workloads.text_block(workloads.content_key("tok-bench", kb), kb * 205)
            body = json.dumps({"prompt": text})
            out.append(_summary("service", _timed(
                lambda: _post(conn, "/v1/completions", body), requests, max_seconds),
                kb=kb))
            out.append(_summary("transformers", _timed(
                lambda: tok.encode(text), requests, max_seconds), kb=kb))
    finally:
        conn.close()
    return out


def _service_stats(svc):
    status, _, body = control.request(svc.socket, "GET", "/stats")
    if status != 200:
        raise click.ClickException(f"the service answered {status} to /stats")
    return json.loads(body)


def multi_turn(svc, conversations, turns, max_seconds, label):
    """Round trip per request, and the service's own time per request (its
    /stats busy_s and cpu_s: parse, render, tokenize, answer, without the
    transport, which is the same with and without the cache)."""
    sessions = workloads.multiturn_workload(conversations * turns, turns, 1000, 400, 200,
                                            seed=11)
    before = _service_stats(svc)
    times, deadline = [], time.monotonic() + max_seconds
    for s in sessions:
        if time.monotonic() > deadline:
            break
        conn = control._UnixHTTP(svc.socket, 60)
        try:
            msgs = [{"role": "system", "content": s.system}]
            for t, turn in enumerate(s.turns):
                msgs.append({"role": "user", "content": turn.prompt})
                body = json.dumps({"messages": msgs})
                start = time.perf_counter()
                _post(conn, "/v1/chat/completions", body)
                times.append(time.perf_counter() - start)
                msgs.append({"role": "assistant",
                             "content": workloads.text_block(
                                 workloads.content_key("tok-bench-a", s.index, t), 200)})
        finally:
            conn.close()
    after = _service_stats(svc)
    n = after["requests"] - before["requests"]
    return _summary("multi-turn", times, reuse=label, turns=turns,
                    service_ms=(after["busy_s"] - before["busy_s"]) / n * 1e3,
                    service_cpu_ms=(after["cpu_s"] - before["cpu_s"]) / n * 1e3,
                    tokens=after["tokens"] - before["tokens"],
                    reused_tokens=after["reused_tokens"] - before["reused_tokens"])


def run(model_path, chat_template=None, requests=50, max_seconds=30.0, conversations=8,
        turns=8, emit=print):
    results = []
    with tempfile.TemporaryDirectory(prefix="omni-tok-bench-") as tmp:
        for label, extra in (("on", ()), ("off", ("--no-reuse-cache",))):
            if chat_template:
                extra += ("--chat-template", str(chat_template))
            svc = control.Service.in_prefix(Path(tmp) / label, model_path, workers=1,
                                            extra=extra)
            control.start(svc, timeout=120)
            try:
                if label == "on":
                    for r in by_size(svc, model_path, requests, max_seconds):
                        emit(json.dumps(r))
                        results.append(r)
                r = multi_turn(svc, conversations, turns, max_seconds, label)
                emit(json.dumps(r))
                results.append(r)
            finally:
                control.stop(svc)
    return results


@click.command()
@click.option("--model-path", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--requests", type=click.IntRange(1), default=50, show_default=True,
              help="Requests per prompt size.")
@click.option("--conversations", type=click.IntRange(1), default=8, show_default=True)
@click.option("--turns", type=click.IntRange(2), default=8, show_default=True)
@click.option("--max-seconds", type=float, default=30.0, show_default=True,
              help="Time limit of each measurement.")
def main(model_path, chat_template, requests, conversations, turns, max_seconds):
    """Benchmark the tokenizer service (see the module docstring)."""
    results = run(model_path, chat_template, requests, max_seconds, conversations, turns,
                  emit=lambda line: click.echo(line, err=True))
    turns_ = {r["reuse"]: r for r in results if r["name"] == "multi-turn"}
    click.echo(f"{'what':<28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'n':>6}")
    for r in results:
        what = (f"{r['name']} {r['kb']} KB" if "kb" in r
                else f"{r['name']} reuse {r['reuse']}")
        click.echo(f"{what:<28}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}"
                   f"{r['mean_ms']:>10.3f}{r['n']:>6}")
    if len(turns_) == 2:
        on, off = turns_["on"], turns_["off"]
        # the cache's bound here: tokens encoded without it / with it
        encoded = off["tokens"] / max(1, on["tokens"] - on["reused_tokens"])
        click.echo("multi-turn, without / with the reuse cache: "
                   + ", ".join(f"{k} {off[k] / on[k]:.2f}x" for k in
                               ("mean_ms", "p50_ms", "p99_ms", "service_ms",
                                "service_cpu_ms"))
                   + f"; tokens encoded {encoded:.2f}x")


if __name__ == "__main__":
    main()
