"""The load generator: an asyncio streaming client for OpenAI-compatible servers.

Open loop: sessions start at given instants (Poisson at a rate, or a trace's
timestamps), whatever the server does. Closed loop: C workers each send the
next session's turns as soon as their previous request ended. A multi-turn
session's turns always run one after the other (each resends the history).

Everything is bounded: `max_duration_s` is a hard stop (requests in flight are
cancelled and counted as errors of kind "cancelled"), each request has its own
timeout, and every request that was sent ends up in the records exactly once.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from . import simstats
from .errors import BenchError
from .metrics import RequestRecord
from .workloads import LazyTracePrompt, Session

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_ERROR_BODY_LIMIT = 2000


@dataclass
class BenchConfig:
    target: str                        # base URL, e.g. http://127.0.0.1:8080
    endpoint: str = "completions"      # completions | chat
    stream: bool = True
    model: str | None = None           # None: ask /v1/models, else "default"
    rate: float | None = None          # open loop, Poisson, requests (sessions)/s
    concurrency: int | None = None     # closed loop
    use_arrival_times: bool = False    # open loop on the sessions' arrival_s
    max_duration_s: float = 600.0
    request_timeout_s: float = 300.0
    seed: int = 0
    extra_body: dict = field(default_factory=dict)
    progress: bool = True
    sim_stats_url: str | None = None
    sim_interval_s: float = 0.5
    run_id: str = "bench"
    # called with the run's t0 (perf_counter) once the clock starts
    on_start: Callable[[float], None] | None = field(default=None, repr=False)


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    not_sent: int
    stopped_early: bool
    model: str
    sim_before: dict | None = None
    sim_after: dict | None = None
    sim_samples: list = field(default_factory=list)
    target_label: dict | None = None
    sim_requests: dict | None = None   # /sim/stats?requests=N after the run (bound.py)


# --- SSE --------------------------------------------------------------------

class SSEParser:
    """Splits a byte stream into the payloads of its `data:` lines."""

    def __init__(self):
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in data:
            return []
        *lines, self._buf = self._buf.split(b"\n")
        return [p for p in map(self._payload, lines) if p is not None]

    def close(self) -> list[bytes]:
        rest, self._buf = self._buf, b""
        p = self._payload(rest)
        return [] if p is None else [p]

    @staticmethod
    def _payload(line: bytes):
        line = line.rstrip(b"\r")
        if line.startswith(b"data:"):
            return line[5:].strip()
        return None


def chunk_text(obj: dict, chat: bool) -> str:
    """The generated text a streamed chunk carries ("" for role/usage chunks)."""
    out = []
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if chat:
            delta = choice.get("delta") or {}
            t = delta.get("content") or delta.get("reasoning_content") or ""
        else:
            t = choice.get("text") or ""
        if isinstance(t, str):
            out.append(t)
    return "".join(out)


def _response_text(obj: dict, chat: bool) -> str:
    out = []
    for choice in obj.get("choices") or ():
        if chat:
            t = (choice.get("message") or {}).get("content") or ""
        else:
            t = choice.get("text") or ""
        out.append(t if isinstance(t, str) else "")
    return "".join(out)


def _is_error_json(payload: bytes) -> bool:
    """Is an error answer's body the API's JSON error object?"""
    try:
        obj = json.loads(payload)
    except (ValueError, TypeError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict) \
        and isinstance(obj["error"].get("message"), str)


def _error_message(payload: bytes) -> str:
    try:
        obj = json.loads(payload)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:_ERROR_BODY_LIMIT]
        return json.dumps(err)[:_ERROR_BODY_LIMIT]
    except (ValueError, TypeError):
        return payload[:_ERROR_BODY_LIMIT].decode("utf-8", "replace")


# --- request bodies ----------------------------------------------------------

def user_prompt(turn_prompt):
    if isinstance(turn_prompt, LazyTracePrompt):
        return turn_prompt.build()
    return turn_prompt


def build_body(cfg: BenchConfig, model: str, sess: Session, turn_idx: int,
               user) -> dict:
    """The JSON body for one turn. `user` is the turn's prompt (text or ids);
    the session's system prompt and history are added around it."""
    turn = sess.turns[turn_idx]
    chat = cfg.endpoint == "chat"
    body: dict = {"model": model}
    if chat:
        msgs = [{"role": "system", "content": sess.system}] if sess.system else []
        for u, a in sess.history:
            msgs += [{"role": "user", "content": u},
                     {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": user})
        body["messages"] = msgs
        body["max_completion_tokens"] = turn.max_tokens
    else:
        if isinstance(user, list):
            body["prompt"] = user
        elif sess.multiturn:
            parts = [sess.system] if sess.system else []
            for u, a in sess.history:
                parts += [f"User: {u}", f"Assistant: {a}"]
            parts += [f"User: {user}", "Assistant:"]
            body["prompt"] = "\n".join(parts)
        else:
            body["prompt"] = f"{sess.system}\n\n{user}" if sess.system else user
    body["max_tokens"] = turn.max_tokens
    body["min_tokens"] = turn.max_tokens
    body["ignore_eos"] = True
    body["temperature"] = 0
    body["stream"] = cfg.stream
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    body.update(cfg.extra_body)
    return body


# --- one request ----------------------------------------------------------------

async def send_request(http: aiohttp.ClientSession, url: str, body: bytes,
                       rec: RequestRecord, chat: bool, stream: bool,
                       t0: float, timeout_s: float, request_id: str) -> None:
    """Send one request and fill `rec`. Never raises except CancelledError;
    every failure becomes rec.error_kind."""
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    start = time.perf_counter()
    rec.start_s = start - t0
    try:
        async with asyncio.timeout(timeout_s):
            async with http.post(url, data=body, headers=headers) as resp:
                rec.http_status = resp.status
                # behind Omni Proxy the engines see the proxy's own id, not ours
                rec.engine_request_id = resp.headers.get("X-Omni-Request-Id")
                if resp.status != 200:
                    payload = await resp.content.read(64 * 1024)
                    _fail(rec, f"http_{resp.status}", _error_message(payload))
                    rec.error_json = _is_error_json(payload)
                elif stream:
                    await _read_stream(resp, rec, chat, start)
                else:
                    await _read_whole(resp, rec, chat, start)
    except TimeoutError:
        _fail(rec, "timeout", f"no complete answer within {timeout_s:g} s")
    except aiohttp.ClientConnectorError as exc:
        _fail(rec, "connect", str(exc))
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
            aiohttp.ClientOSError, ConnectionError) as exc:
        _fail(rec, "disconnect", f"{type(exc).__name__}: {exc}")
    except aiohttp.ClientError as exc:
        _fail(rec, "client_error", f"{type(exc).__name__}: {exc}")
    except ValueError as exc:    # JSON that does not parse
        _fail(rec, "bad_response", str(exc)[:_ERROR_BODY_LIMIT])
    end = time.perf_counter()
    rec.end_s = end - t0
    rec.e2e_ms = (end - start) * 1000.0
    if rec.ok and rec.output_tokens == 0:
        _fail(rec, "empty_response", "the answer carried no generated text")


def _fail(rec: RequestRecord, kind: str, message: str) -> None:
    rec.ok = False
    rec.error_kind = kind
    rec.error = message


async def _read_stream(resp, rec: RequestRecord, chat: bool, start: float):
    parser = SSEParser()
    last = None
    chunks = 0
    usage_tokens = None
    text = []
    done = False

    def handle(payloads, now):
        nonlocal last, chunks, usage_tokens, done
        for p in payloads:
            if p == b"[DONE]":
                done = True
                continue
            if not p:
                continue
            obj = json.loads(p)
            if not isinstance(obj, dict):
                raise ValueError(f"stream chunk is not an object: {p[:200]!r}")
            if "error" in obj:
                raise _StreamError(_error_message(p))
            t = chunk_text(obj, chat)
            if t:
                if last is None:
                    rec.ttft_ms = (now - start) * 1000.0
                else:
                    rec.itl_ms.append((now - last) * 1000.0)
                last = now
                chunks += 1
                text.append(t)
            usage = obj.get("usage")
            if isinstance(usage, dict):
                if usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                if usage.get("prompt_tokens") is not None:
                    rec.prompt_tokens = int(usage["prompt_tokens"])

    try:
        async for data in resp.content.iter_any():
            handle(parser.feed(data), time.perf_counter())
        handle(parser.close(), time.perf_counter())
    except _StreamError as exc:
        _fail(rec, "stream_error", str(exc))
        return
    rec.text = "".join(text)
    if usage_tokens is not None:
        rec.output_tokens, rec.output_tokens_from = usage_tokens, "usage"
    else:
        rec.output_tokens, rec.output_tokens_from = chunks, "chunks"
    if not done:
        _fail(rec, "incomplete_stream",
              f"stream ended after {chunks} chunks without [DONE]")
        return
    rec.ok = True


class _StreamError(Exception):
    pass


async def _read_whole(resp, rec: RequestRecord, chat: bool, start: float):
    payload = await resp.read()
    now = time.perf_counter()
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        raise ValueError("answer is not a JSON object")
    if "error" in obj:
        _fail(rec, "stream_error", _error_message(payload))
        return
    rec.text = _response_text(obj, chat)
    rec.ttft_ms = (now - start) * 1000.0   # no stream: first token = last
    usage = obj.get("usage") or {}
    if usage.get("prompt_tokens") is not None:
        rec.prompt_tokens = int(usage["prompt_tokens"])
    if usage.get("completion_tokens") is not None:
        rec.output_tokens, rec.output_tokens_from = int(usage["completion_tokens"]), "usage"
    else:
        rec.output_tokens = len(rec.text.split())
        rec.output_tokens_from = "words"
    rec.ok = True


# --- the run ----------------------------------------------------------------------

async def discover_model(http: aiohttp.ClientSession, target: str) -> str:
    try:
        async with asyncio.timeout(5):
            async with http.get(target + "/v1/models") as resp:
                if resp.status == 200:
                    data = (await resp.json(content_type=None)).get("data") or []
                    if data and data[0].get("id"):
                        return str(data[0]["id"])
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
        pass
    return "default"


async def target_label(http: aiohttp.ClientSession, target: str) -> dict | None:
    """Omni Proxy's policies from /omni/status, only to label results."""
    try:
        async with asyncio.timeout(3):
            async with http.get(target + "/omni/status") as resp:
                if resp.status != 200:
                    return None
                st = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    if not isinstance(st, dict):
        return None
    return {k: st[k] for k in ("pd_policy", "schedule_policy", "version") if k in st}


class Runner:
    def __init__(self, cfg: BenchConfig, sessions: list[Session]):
        if cfg.endpoint not in ENDPOINTS:
            raise BenchError(f"--endpoint must be completions or chat, got '{cfg.endpoint}'")
        if (cfg.rate is None) == (cfg.concurrency is None) and not cfg.use_arrival_times:
            raise BenchError("give exactly one of --rate, --concurrency or trace times")
        if cfg.concurrency is not None and cfg.concurrency < 1:
            raise BenchError(f"--concurrency must be >= 1, got {cfg.concurrency}")
        if cfg.rate is not None and not cfg.rate > 0:
            raise BenchError(f"--rate must be > 0 (or inf), got {cfg.rate}")
        if cfg.max_duration_s <= 0:
            raise BenchError(f"--max-duration must be > 0, got {cfg.max_duration_s}")
        self.cfg = cfg
        self.sessions = sessions
        self.planned = sum(len(s.turns) for s in sessions)
        self.records: list[RequestRecord] = []
        self.tasks: set[asyncio.Task] = set()
        self.url = cfg.target.rstrip("/") + ENDPOINTS[cfg.endpoint]
        self.t0 = 0.0

    # arrival instants, seconds from the start, one per session
    def arrivals(self) -> list[float]:
        if self.cfg.rate is not None:
            if math.isinf(self.cfg.rate):
                return [0.0] * len(self.sessions)
            rng = random.Random(self.cfg.seed)
            t, out = 0.0, []
            for _ in self.sessions:
                out.append(t)
                t += rng.expovariate(self.cfg.rate)
            return out
        return [s.arrival_s or 0.0 for s in self.sessions]

    async def run(self) -> RunResult:
        cfg = self.cfg
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False) as http:
            self.http = http
            model = cfg.model or await discover_model(http, cfg.target.rstrip("/"))
            self.model = model
            label = await target_label(http, cfg.target.rstrip("/"))
            sampler = None
            sim_before = None
            if cfg.sim_stats_url:
                sim_before = await simstats.fetch(http, cfg.sim_stats_url)
                sampler = simstats.Sampler(http, cfg.sim_stats_url, cfg.sim_interval_s)
            self.t0 = time.perf_counter()
            if cfg.on_start:
                cfg.on_start(self.t0)
            if sampler:
                sampler.start(self.t0)
            progress = asyncio.create_task(self._progress()) if cfg.progress else None
            driver = asyncio.create_task(self._drive())
            _, pending = await asyncio.wait({driver}, timeout=cfg.max_duration_s)
            stopped = bool(pending)
            if stopped:
                driver.cancel()
                for t in list(self.tasks):
                    t.cancel()
            await asyncio.gather(driver, *self.tasks, return_exceptions=True)
            end = time.perf_counter()
            if progress:
                progress.cancel()
                await asyncio.gather(progress, return_exceptions=True)
                self._print_progress(final=True)
            sim_after = None
            samples = []
            if sampler:
                samples = await sampler.stop()
                sim_after = await simstats.fetch(http, cfg.sim_stats_url)
        for r in self.records:
            if r.end_s is None:        # cut by the hard stop
                r.end_s = end - self.t0
                if r.start_s is not None:
                    r.e2e_ms = (r.end_s - r.start_s) * 1000.0
                _fail(r, "cancelled", f"still running at --max-duration {cfg.max_duration_s:g} s")
        return RunResult(self.records, end - self.t0, self.planned - len(self.records),
                         stopped, model, sim_before, sim_after, samples, label)

    async def _drive(self):
        if self.cfg.concurrency is not None:
            it = iter(self.sessions)

            async def worker():
                for sess in it:
                    await self._session(sess, None)
            workers = [asyncio.create_task(worker())
                       for _ in range(min(self.cfg.concurrency, len(self.sessions)))]
            self.tasks.update(workers)
            await asyncio.gather(*workers)
            return
        order = sorted(zip(self.arrivals(), self.sessions), key=lambda p: p[0])
        for due, sess in order:
            delay = self.t0 + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._session(sess, due))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def _session(self, sess: Session, due: float | None):
        prior = 0      # tokens of history resent before this turn's own prompt
        for i, turn in enumerate(sess.turns):
            user = user_prompt(turn.prompt)
            body = build_body(self.cfg, self.model, sess, i, user)
            rec = RequestRecord(index=len(self.records), session=sess.index, turn=i,
                                scheduled_s=due if i == 0 else None,
                                prompt_len=prior + turn.prompt_len)
            self.records.append(rec)
            await send_request(self.http, self.url, json.dumps(body).encode(), rec,
                               self.cfg.endpoint == "chat", self.cfg.stream, self.t0,
                               self.cfg.request_timeout_s,
                               f"{self.cfg.run_id}-{rec.index}")
            if i + 1 < len(sess.turns):
                # The next turn resends what was asked and answered (a failed
                # turn's answer is empty: the conversation goes on without it).
                sess.history.append((user, rec.text))
                prior += turn.prompt_len + rec.output_tokens

    def _counts(self):
        done = sum(1 for r in self.records if r.end_s is not None)
        errors = sum(1 for r in self.records if r.end_s is not None and not r.ok)
        return len(self.records), done, errors

    def _print_progress(self, final=False):
        sent, done, errors = self._counts()
        line = (f"[bench] {time.perf_counter() - self.t0:7.1f}s  sent {sent}/{self.planned}"
                f"  done {done}  errors {errors}  in flight {sent - done}")
        tty = sys.stderr.isatty()
        if tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    async def _progress(self):
        period = 0.5 if sys.stderr.isatty() else 5.0
        while True:
            await asyncio.sleep(period)
            self._print_progress()


def run(cfg: BenchConfig, sessions: list[Session]) -> RunResult:
    return asyncio.run(Runner(cfg, sessions).run())
