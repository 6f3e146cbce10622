"""A micro-benchmark of the tokenizer service (for docs/benchmarks.md, run on
a quiet machine):

    python -m omni_ctl.tokenizer.bench --model-path DIR [--requests N] [--out FILE]

- by prompt size (1 KB, 16 KB, 200 KB of text): the service's round trip
  over its socket (HTTP, parse, encode, binary answer) against transformers'
  own encode in this process (what an engine spends tokenizing), p50/p99;
- multi-turn conversations (bench workload "multiturn"), each sent over one
  connection (one worker): time per request with the reuse cache and without,
  and with answer learning (each turn's answer sent to the worker's learn
  socket as the proxy sends it, wire.learn_message): the request path's
  service time apart from the learning's.  Each side's service first serves
  as many other conversations, unmeasured (a service in use is warm);
- the same conversations paired in one worker ("multi-turn paired"): each
  turn sent tokenized whole (`?reuse=0`, the cache neither read nor filled)
  and with the cache and answer learning, each side's service time counted
  apart: the ratio without the machine's drift between separate
  measurements.  Two pairings, each in its own service: by turn (the sides
  alternate turn by turn: every other cached turn follows a whole encode,
  which takes the CPU's caches from it) and by conversation (a
  conversation's turns on one side, then on the other).

`--inprocess MODE` instead runs the same conversations through the service's
request handler (server.App) in this process (no transport, no fork), for an
instruction count under callgrind that the machine's load does not move, or
the handler's own time per request (service_ms, after the same warm-up as
the service's): MODE off (no cache), on (the cache), learn (the cache and
answer learning), load (only load the tokenizer).  `--count request|learn`
makes that part go through a ctypes callback, so that `valgrind
--tool=callgrind --toggle-collect=ffi_call` counts only it (and skips the
warm-up: docs/benchmarks.md section 9).

Prints one JSON object per measurement and a table.  Counts and time are
bounded (--requests, --max-seconds per measurement).
"""

from __future__ import annotations

import ctypes
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import click

from ..bench import workloads
from . import control, core, server, wire

SIZES_KB = (1, 16, 200)
# the warm-up's conversations: 3 x as many as measured (a worker forked
# from the loaded parent copies the pages it writes for its first few
# hundred requests)
WARM_UP_SEEDS = (12, 13, 14)


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


def _conversations(conversations, turns, seed=11):
    """[(system, [(user message, the engine's answer)])] of the bench (seed
    11 is measured; another seed gives other conversations to warm up on)."""
    sessions = workloads.multiturn_workload(conversations * turns, turns, 1000, 400, 200,
                                            seed=seed)
    return [(s.system, [(turn.prompt, workloads.text_block(
        workloads.content_key("tok-bench-a", seed, s.index, t), 200))
        for t, turn in enumerate(s.turns)]) for s in sessions]


def _turn_bodies(system, turns):
    """(request body, answer) of each turn of one conversation."""
    msgs = [{"role": "system", "content": system}]
    for user, answer in turns:
        msgs.append({"role": "user", "content": user})
        yield json.dumps({"messages": msgs}).encode(), answer
        msgs.append({"role": "assistant", "content": answer})


def _learn_sent(conn, before, deadline):
    """Wait until the worker has read every answer sent (the next turn of a
    real client comes after its reader read the answer).  Asked on the
    conversation's own connection (a new connection per ask would make the
    worker accept and set up one each time, work only this side does), and
    again at once, without sleeping: an idle pause before each learned turn
    only (the other sides send back to back) would measure a worker gone
    cold on one side of the ratio and not on the other."""
    asks = 0
    while time.monotonic() < deadline:
        conn.request("GET", "/stats")
        r = conn.getresponse()
        st = json.loads(r.read())
        asks += 1
        if st["learn_received"] >= before:
            return st["learn_received"], asks
    raise click.ClickException("the service did not read a learn datagram in time")


class _Side:
    """One side of the multi-turn comparison: its service, and what its
    measured conversations took (round trip per request; the service's own
    time per request from its /stats busy_s and cpu_s: parse, render,
    tokenize, answer, without the transport, which is the same with and
    without the cache; with learn, each answer also goes to the learn
    socket, learn_cpu_s: its cost)."""

    def __init__(self, label, svc, learn=None):
        self.label, self.svc = label, svc
        self.learn = label == "learn" if learn is None else learn
        self.route = "/v1/chat/completions" + ("?learn=1" if self.learn else "")
        self.out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def begin(self):
        self.before = _service_stats(self.svc)
        self.sent = self.before["learn_received"]
        self.times, self.asks = [], 0

    def conversation(self, system, conv):
        conn = control._UnixHTTP(self.svc.socket, 60)
        try:
            for body, answer in _turn_bodies(system, conv):
                start = time.perf_counter()
                data = _post(conn, self.route, body)
                self.times.append(time.perf_counter() - start)
                if self.learn:
                    self._learn_answer(conn, data, answer)
        finally:
            conn.close()

    def _learn_answer(self, conn, data, answer):
        """Send the answer of the request that got `data` to its worker's
        learn socket, as the proxy does, and wait until it has been read."""
        handle = wire.handle_of(data)
        self.out.sendto(wire.learn_message(handle, answer), socket.MSG_DONTWAIT,
                        server.worker_socket(str(self.svc.learn_socket), handle >> 48))
        self.sent, asks = _learn_sent(conn, self.sent + 1, time.monotonic() + 30)
        self.asks += asks

    def summary(self, turns):
        after = _service_stats(self.svc)
        before = self.before
        n = after["requests"] - before["requests"]
        d = {k: after[k] - before[k] for k in after if k.startswith("learn")}
        return _summary("multi-turn", self.times, reuse=self.label, turns=turns,
                        service_ms=(after["busy_s"] - before["busy_s"]) / n * 1e3,
                        service_cpu_ms=(after["cpu_s"] - before["cpu_s"]) / n * 1e3,
                        learn_cpu_ms=d["learn_cpu_s"] / n * 1e3,
                        tokens=after["tokens"] - before["tokens"],
                        reused_tokens=after["reused_tokens"] - before["reused_tokens"],
                        learned=d["learned"],
                        learn_encoded_tokens=d["learn_encoded_tokens"],
                        stats_asks=self.asks)

    def close(self):
        self.out.close()


_PAIRED = ("turn", "conversation")


class _Paired(_Side):
    """Both sides of the multi-turn ratio in one worker, so that a slow
    spell of the machine or a cold cache falls on both alike (the separate
    services are measured seconds apart, and the machine's speed moves by
    15-30% between such measurements): each turn sent tokenized whole
    (`?reuse=0`: the cache neither read nor filled) and with the cache and
    answer learning, each side's service time counted apart.  by="turn":
    the two sides alternate turn by turn, so every other cached turn comes
    right after a whole encode of the conversation, which takes the CPU's
    caches from it (a worker serving the workload never does that
    between two turns); by="conversation": all turns of a conversation on
    one side, then on the other, the side that goes first alternating
    (tens of milliseconds apart: still paired against the drift)."""

    def __init__(self, svc, by="turn"):
        super().__init__("paired", svc, learn=True)
        self.by = by

    def conversation(self, system, conv):
        conn = control._UnixHTTP(self.svc.socket, 60)
        turns = list(_turn_bodies(system, conv))
        # what goes to one side before the other: a turn, or all of them
        units = [turns] if self.by == "conversation" else [[t] for t in turns]
        try:
            for unit in units:
                self.unit += 1
                sides = [self._whole, self._cached]
                for side in sides if self.unit % 2 else sides[::-1]:
                    for body, answer in unit:
                        side(conn, body, answer)
        finally:
            conn.close()

    def _whole(self, conn, body, answer):
        _post(conn, "/v1/chat/completions?reuse=0", body)

    def _cached(self, conn, body, answer):
        self._learn_answer(conn, _post(conn, self.route, body), answer)

    def begin(self):
        super().begin()
        self.unit = 0

    def summary(self, turns):
        after = _service_stats(self.svc)
        b = self.before

        def d(k):
            return after[k] - b[k]
        whole = d("noreuse_requests")
        cached = d("requests") - whole
        out = {"name": "multi-turn paired", "by": self.by, "turns": turns, "n": cached,
               "whole_ms": d("noreuse_busy_s") / max(1, whole) * 1e3,
               "whole_cpu_ms": d("noreuse_cpu_s") / max(1, whole) * 1e3,
               "cached_ms": d("busy_s") / max(1, cached) * 1e3,
               "cached_cpu_ms": d("cpu_s") / max(1, cached) * 1e3,
               "learn_cpu_ms": d("learn_cpu_s") / max(1, cached) * 1e3,
               "learned": d("learned"), "reused_tokens": d("reused_tokens")}
        out["ratio"] = out["whole_ms"] / max(out["cached_ms"], 1e-9)
        out["cpu_ratio"] = out["whole_cpu_ms"] / max(out["cached_cpu_ms"], 1e-9)
        return out


def multi_turn(side, conversations, turns, max_seconds, seed=11):
    """The conversations of seed on one side, back to back (each side is
    measured on its own: switching services between conversations makes
    every side pay for caches another process took, more than what it
    measures)."""
    side.begin()
    deadline = time.monotonic() + max_seconds
    for system, conv in _conversations(conversations, turns, seed):
        if time.monotonic() > deadline:
            break
        side.conversation(system, conv)
    return side.summary(turns)


def in_process(model_path, mode, count=None, conversations=8, turns=8,
               chat_template=None):
    """The bench's conversations through server.App in this process (for
    callgrind); count: "request" or "learn" goes through a ctypes callback
    (ffi_call), the part `--toggle-collect=ffi_call` counts.  Returns the
    tokenizer's stats."""
    tok = core.ModelTokenizer(model_path, chat_template, reuse=mode != "off")
    if mode == "load":
        return tok.stats
    tok.start_handles(0)
    app = server.App(tok, 1 << 30)
    route = "/v1/chat/completions" + ("?learn=1" if mode == "learn" else "")
    box = []

    def through(fn, counted):
        if not counted:
            return fn()
        cb = ctypes.CFUNCTYPE(None)(lambda: box.append(fn()))
        cb()
        return box.pop()

    def run_seed(seed, counted):
        for system, conv in _conversations(conversations, turns, seed):
            for body, answer in _turn_bodies(system, conv):
                status, _, data = through(lambda: app.handle("POST", route, body),
                                          counted == "request")
                if status != 200:
                    raise click.ClickException(
                        f"the handler answered {status}: {data[:200]!r}")
                if mode == "learn":
                    msg = wire.learn_message(wire.handle_of(data), answer)
                    through(lambda: app.learn(msg), counted == "learn")

    if count is None:
        # timed (not counted): warm as the service bench is, then only the
        # measured conversations in the stats
        for seed in WARM_UP_SEEDS:
            run_seed(seed, None)
        for k in tok.stats:
            tok.stats[k] = type(tok.stats[k])(0)
    run_seed(11, count)
    return tok.stats


def run(model_path, chat_template=None, requests=50, max_seconds=30.0, conversations=8,
        turns=8, emit=print):
    results = []
    with tempfile.TemporaryDirectory(prefix="omni-tok-bench-") as tmp:
        sides = []
        try:
            for label, extra in (("on", ()), ("learn", ()), ("off", ("--no-reuse-cache",)),
                                 ("turn", ()), ("conversation", ())):
                if chat_template:
                    extra += ("--chat-template", str(chat_template))
                svc = control.Service.in_prefix(Path(tmp) / label, model_path, workers=1,
                                                extra=extra)
                control.start(svc, timeout=120)
                sides.append(_Paired(svc, label) if label in _PAIRED else _Side(label, svc))
            for r in by_size(sides[0].svc, model_path, requests, max_seconds):
                emit(json.dumps(r))
                results.append(r)
            # a service in use is warm: other conversations first
            # (unmeasured; they share nothing with the measured ones), the
            # same way on every side
            for side in sides:
                for seed in WARM_UP_SEEDS:
                    multi_turn(side, conversations, turns, max_seconds, seed)
                r = multi_turn(side, conversations, turns, max_seconds)
                emit(json.dumps(r))
                results.append(r)
        finally:
            for side in sides:
                side.close()
                control.stop(side.svc)
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
@click.option("--inprocess", type=click.Choice(["off", "on", "learn", "load"]), default=None,
              help="Only run the conversations through the handler in this process.")
@click.option("--count", type=click.Choice(["request", "learn"]), default=None,
              help="With --inprocess: the part called through ctypes (ffi_call).")
def main(model_path, chat_template, requests, conversations, turns, max_seconds,
         inprocess, count):
    """Benchmark the tokenizer service (see the module docstring)."""
    from ..cli import exit_on_sigterm

    exit_on_sigterm()
    if inprocess:
        template = Path(chat_template).read_text(encoding="utf-8") if chat_template \
            else None
        stats = in_process(model_path, inprocess, count, conversations, turns, template)
        out = {k: v for k, v in stats.items() if not k.endswith("_s")}
        if stats.get("requests"):
            # the handler's own time per request (no transport, no fork)
            out["service_ms"] = stats["busy_s"] / stats["requests"] * 1e3
        click.echo(json.dumps(out))
        return
    results = run(model_path, chat_template, requests, max_seconds, conversations, turns,
                  emit=lambda line: click.echo(line, err=True))
    turns_ = {r["reuse"]: r for r in results if r["name"] == "multi-turn"}
    click.echo(f"{'what':<28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'n':>6}")
    for r in results:
        if r["name"] == "multi-turn paired":
            continue
        what = (f"{r['name']} {r['kb']} KB" if "kb" in r
                else f"{r['name']} reuse {r['reuse']}")
        click.echo(f"{what:<28}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}"
                   f"{r['mean_ms']:>10.3f}{r['n']:>6}")
    off = turns_.get("off")
    for label in ("on", "learn") if off else ():
        on = turns_.get(label)
        if on is None:
            continue
        # the request path's bound: tokens encoded without the cache / with it
        encoded = off["tokens"] / max(1, on["tokens"] - on["reused_tokens"])
        total = (on["service_cpu_ms"] + on["learn_cpu_ms"])
        click.echo(f"multi-turn, without / with the reuse cache ({label}): "
                   + ", ".join(f"{k} {off[k] / on[k]:.2f}x" for k in
                               ("mean_ms", "p50_ms", "p99_ms", "service_ms",
                                "service_cpu_ms"))
                   + f"; tokens encoded on the request path {encoded:.2f}x"
                   + f"; service CPU with learning {off['service_cpu_ms'] / total:.2f}x"
                   + f" (learning {on['learn_cpu_ms']:.3f} ms, "
                   + f"{on['learn_encoded_tokens']} tokens, {on['learned']} answers)")
    for r in results:
        if r["name"] == "multi-turn paired":
            how = ("each turn whole and with the cache and learning, alternating"
                   if r["by"] == "turn" else
                   "each conversation's turns whole, then with the cache and learning, "
                   "the order alternating")
            click.echo(f"multi-turn, paired in one worker by {r['by']} ({how}): service "
                       f"time without / with {r['whole_ms']:.3f} / {r['cached_ms']:.3f} ms"
                       f" = {r['ratio']:.2f}x, CPU {r['cpu_ratio']:.2f}x (learning "
                       f"{r['learn_cpu_ms']:.3f} ms, {r['learned']} answers)")


if __name__ == "__main__":
    main()
