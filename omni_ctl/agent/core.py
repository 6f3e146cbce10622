"""The agent: per instance, KV events (ZMQ SUB + replay DEALER), /metrics and
/health; everything it hears goes into batches (:mod:`.batch`) pushed to a
sink (the proxy's ingestion endpoint, a dump file or a Python callable).

Consistency per publisher (one per engine, one per DP rank): sequence
numbers must follow one another.  On a gap the agent asks the replay
endpoint for exactly the missing range (from the first missing number); if
the answer does not start there (the engine's buffer no longer has it) or
does not come, the instance is resynchronised: a CLEAR record, state
approximate, and it stays approximate until the engine clears its cache
(AllBlocksCleared: its state is then known) or the stream has run `settle`
seconds without a gap.  At start every instance is cleared and caught up by
a replay from sequence 0: precise when the engine's buffer still starts
there, else approximate as above.
"""

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import time

import aiohttp
import zmq
import zmq.asyncio

from .batch import Batch
from .chains import Chains
from .events import EventDecodeError, decode_payload
from .metrics import parse_metrics

log = logging.getLogger("omni_ctl.agent")

END = -1
RECENT = 4096       # digests of the last applied messages, per publisher


def _digest(payload):
    return hashlib.blake2b(payload, digest_size=8).digest()


@dataclasses.dataclass
class Publisher:
    """One KV-event publisher: an engine, or one DP rank of it."""
    endpoint: str
    replay: str = None
    rank: int = 0


@dataclasses.dataclass
class InstanceSpec:
    name: str                   # "host:port", as the proxy names the server
    url: str                    # base URL for /metrics and /health
    publishers: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Options:
    block_size: int = 16            # the index's (omni_block_size)
    topic: str = "kv-events"
    bind: bool = False              # SUB binds, engines connect
    replay_timeout: float = 2.0     # per replay message
    idle_check: float = 5.0         # quiet stream: ask replay what came
    settle: float = 10.0            # gap-free seconds back to precise
    metrics_interval: float = 1.0   # 0: off
    health_interval: float = 1.0    # 0: off
    health_timeout: float = 1.0
    fall: int = 2
    rise: int = 2
    flush_interval: float = 0.02    # at most one push per this many seconds
    max_batch_bytes: int = 256 * 1024


class Stream:
    def __init__(self, pub):
        self.pub = pub
        self.next = None            # next expected sequence number
        self.approx_since = None    # monotonic time of the last resync
        self.gaps = 0
        self.replays = 0
        self.replayed = 0           # messages recovered by replay
        self.replay_log = []        # (first asked, [seqs answered]), recent
        self.resyncs = 0
        self.messages = 0
        self.bad = 0                # undecodable messages
        self.restarts = 0           # publisher started again from 0
        self.recent = collections.OrderedDict()   # seq -> payload digest
        self.task = None


class Instance:
    def __init__(self, spec, opts):
        self.spec = spec
        self.name = spec.name
        self.streams = [Stream(p) for p in spec.publishers]
        self.chains = Chains(opts.block_size)
        self.mode = "approx"
        self.health = "unknown"
        self.sent_state = None
        self.engine_bs = None
        self.events = 0
        self.skipped = {}
        self.last_event = None
        self.lag = None
        self.health_ok = 0
        self.health_fail = 0
        self.probes = 0             # /health probes started
        self.probe_applied = 0      # the newest probe whose result counted
        self.probe_flip = 0         # the probe that made the last up/down change
        self.last_scrape = None
        self.scrape_errors = 0
        self.sglang_capacity = None

    def status(self):
        return {
            "name": self.name, "mode": self.mode, "health": self.health,
            "events": self.events, "skipped": dict(self.skipped),
            "gaps": sum(s.gaps for s in self.streams),
            "replays": sum(s.replays for s in self.streams),
            "replayed": sum(s.replayed for s in self.streams),
            "resyncs": sum(s.resyncs for s in self.streams),
            "restarts": sum(s.restarts for s in self.streams),
            "bad_messages": sum(s.bad for s in self.streams),
            "next_seq": [s.next for s in self.streams],
            "last_event": self.last_event, "event_lag": self.lag,
            "last_scrape": self.last_scrape,
            "scrape_errors": self.scrape_errors,
            "probes": self.probes, "probe_applied": self.probe_applied,
            "probe_flip": self.probe_flip,
        }


class Agent:
    def __init__(self, specs, sink, opts=None):
        self.opts = opts or Options()
        self.sink = sink
        self.instances = [Instance(s, self.opts) for s in specs]
        self.batch = Batch(self.opts.block_size)
        self.pushed = 0
        self.push_failures = 0
        self.dropped_batches = 0
        self._backoff = 0.0
        self._retry_at = 0.0
        self._ctx = None
        self._http = None
        self._tasks = []
        self._flush_lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._last_push = float("-inf")
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------
    async def start(self):
        self._ctx = zmq.asyncio.Context()
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=max(self.opts.health_timeout, 1.0)))
        loop = asyncio.get_running_loop()
        for inst in self.instances:
            # whatever a previous agent left for it is stale
            self.batch.clear(inst.name)
            self._send_state(inst)
            for st in inst.streams:
                sub = self._subscribe(st.pub)
                st.task = loop.create_task(self._run_stream(inst, st, sub))
                self._tasks.append(st.task)
            if self.opts.metrics_interval > 0:
                self._tasks.append(loop.create_task(self._metrics_loop(inst)))
            if self.opts.health_interval > 0:
                self._tasks.append(loop.create_task(self._health_loop(inst)))
        self._tasks.append(loop.create_task(self._tick_loop()))
        self._tasks.append(loop.create_task(self._push_loop()))

    async def stop(self):
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):     # noqa: BLE001
                pass
        self._tasks = []
        await self.flush(final=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._ctx is not None:
            self._ctx.destroy(0)
            self._ctx = None

    def status(self):
        return {"instances": [i.status() for i in self.instances],
                "pushed": self.pushed, "push_failures": self.push_failures,
                "dropped_batches": self.dropped_batches}

    # -- pushing ----------------------------------------------------------------
    async def flush(self, final=False):
        async with self._flush_lock:
            if not len(self.batch):
                return
            if not final and time.monotonic() < self._retry_at:
                return                      # the endpoint failed: wait
            batch, self.batch = self.batch, Batch(self.opts.block_size)
            try:
                ok = await self.sink(batch)
            except Exception as exc:                        # noqa: BLE001
                log.warning("agent: push failed: %s", exc)
                ok = False
            if ok is False:
                self.push_failures += 1
                self._backoff = min(max(2 * self._backoff, 0.05), 2.0)
                self._retry_at = time.monotonic() + self._backoff
                self._lost(batch)
            else:
                self.pushed += 1
                self._backoff = 0.0
                self._retry_at = 0.0

    def _lost(self, batch):
        """The proxy missed these records: its view of the instances in
        them is no longer the engines'."""
        for inst in self.instances:
            if inst.name in batch.names:
                inst.sent_state = None      # say it again
                for st in inst.streams:
                    self._resync(inst, st, "batch not delivered")

    async def _push_loop(self):
        """Records go out as soon as they come: a record after a quiet
        spell is pushed at once, and those that come while a push is under
        way or within flush_interval of the last one wait for the next, so
        pushes are at most one per flush_interval and the proxy hears of a
        stored block (a prefill's end, for parallel P/D) one push after it
        is published instead of half a period later on average."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            wait = self._last_push + self.opts.flush_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.flush()
            self._last_push = time.monotonic()

    async def _maybe_flush(self):
        if self.batch.nbytes < self.opts.max_batch_bytes:
            if len(self.batch):
                self._dirty.set()
            return
        if time.monotonic() < self._retry_at:
            # the endpoint is down and the batch full: drop it rather than
            # grow without bound (its instances go approximate)
            batch, self.batch = self.batch, Batch(self.opts.block_size)
            self.dropped_batches += 1
            self._lost(batch)
            return
        await self.flush()

    async def _tick_loop(self):
        while True:
            await asyncio.sleep(self.opts.flush_interval)
            now = time.monotonic()
            for inst in self.instances:
                for st in inst.streams:
                    if (st.approx_since is not None and st.next is not None
                            and now - st.approx_since >= self.opts.settle):
                        st.approx_since = None
                self._update_mode(inst)
            if len(self.batch):
                # state, metrics and health records, and a batch held back
                # by a failed push, go with the next push
                self._dirty.set()

    # -- state --------------------------------------------------------------------
    def _update_mode(self, inst):
        precise = bool(inst.streams) and all(
            st.next is not None and st.approx_since is None for st in inst.streams)
        inst.mode = "precise" if precise else "approx"
        self._send_state(inst)

    def _send_state(self, inst):
        state = (inst.mode, inst.health)
        if state != inst.sent_state:
            self.batch.state(inst.name, inst.mode, inst.health)
            inst.sent_state = state

    def _resync(self, inst, st, why):
        """The proxy's view of inst is no longer the engine's: clear it and
        call it approximate until the stream settles."""
        log.warning("agent: %s: resynchronising (%s)", inst.name, why)
        st.resyncs += 1
        st.approx_since = time.monotonic()
        self.batch.clear(inst.name)
        inst.chains.clear()
        self._update_mode(inst)

    # -- KV events ------------------------------------------------------------------
    def _subscribe(self, pub):
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100000)
        sub.setsockopt(zmq.SUBSCRIBE, self.opts.topic.encode())
        if self.opts.bind:
            sub.bind(pub.endpoint)
        else:
            sub.connect(pub.endpoint)
        return sub

    async def _replay(self, st, first):
        """[(seq, payload)] from `first` on, or None if the replay endpoint
        did not answer in time.  Reads vLLM 0.33's framing ([empty, topic,
        seq, payload], end [empty, empty, -1, empty]) and the older one
        ([empty, seq, payload], end [empty, -1, empty])."""
        if not st.pub.replay:
            return None
        st.replays += 1
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(st.pub.replay)
        out = []
        try:
            await dealer.send_multipart([b"", first.to_bytes(8, "big", signed=True)])
            while True:
                if not await dealer.poll(self.opts.replay_timeout * 1000):
                    log.warning("agent: replay %s did not answer", st.pub.replay)
                    return None
                frames = await dealer.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]
                if len(frames) == 3:
                    seqb, payload = frames[1], frames[2]
                elif len(frames) == 2:
                    seqb, payload = frames
                else:
                    st.bad += 1
                    return None
                if len(seqb) != 8:
                    st.bad += 1
                    return None
                seq = int.from_bytes(seqb, "big", signed=True)
                if seq == END:
                    st.replay_log = st.replay_log[-15:] + [(first, [m[0] for m in out])]
                    return out
                out.append((seq, payload))
        finally:
            dealer.close(0)

    async def _apply_replayed(self, inst, st, got):
        for seq, payload in sorted(got, key=lambda m: m[0]):
            if seq < st.next:
                continue
            if seq > st.next:
                break
            st.replayed += 1
            await self._message(inst, st, seq, payload)
            st.next += 1

    async def _catch_up(self, inst, st):
        got = await self._replay(st, 0)
        if got is None:
            self._resync(inst, st, "replay endpoint unavailable at start")
            return
        st.next = 0
        if got and min(s for s, _ in got) > 0:
            # the engine's buffer no longer starts at 0: history lost
            self._resync(inst, st, "history older than the replay buffer")
            st.next = min(s for s, _ in got)
        await self._apply_replayed(inst, st, got)
        self._update_mode(inst)

    async def _run_stream(self, inst, st, sub):
        try:
            await self._catch_up(inst, st)
            while True:
                if not await sub.poll(self.opts.idle_check * 1000):
                    await self._idle(inst, st)
                    continue
                frames = await sub.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    st.bad += 1
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                await self._live(inst, st, seq, frames[2])
        finally:
            sub.close(0)

    async def _idle(self, inst, st):
        """Nothing heard for a while: a last message lost on the wire (or
        sent before the subscription took) shows no gap until the next one;
        the replay buffer says whether there was one."""
        if st.next is None:
            return
        got = await self._replay(st, st.next)
        if got:
            before = st.next
            await self._apply_replayed(inst, st, got)
            if st.next > before:
                st.gaps += 1
            await self.flush()

    async def _live(self, inst, st, seq, payload):
        if st.next is not None and seq < st.next:
            if st.recent.get(seq) == _digest(payload):
                return                      # already had it (via replay)
            # an older number with other content: the engine restarted and
            # numbers from 0 again, with an empty cache
            log.warning("agent: %s: publisher %s restarted", inst.name, st.pub.endpoint)
            st.restarts += 1
            st.recent.clear()
            self.batch.clear(inst.name)
            inst.chains.clear()
            st.next = 0
            st.approx_since = None
        if st.next is not None and seq > st.next:
            st.gaps += 1
            want = st.next
            got = await self._replay(st, want)
            if got is not None:
                await self._apply_replayed(inst, st, got)
            if st.next < seq:
                self._resync(inst, st, f"gap {want}..{seq - 1} not replayable")
                st.next = seq
        if st.next is None or seq == st.next:
            await self._message(inst, st, seq, payload)
            st.next = seq + 1
            self._update_mode(inst)
        await self._maybe_flush()

    async def _message(self, inst, st, seq, payload):
        st.messages += 1
        st.recent[seq] = _digest(payload)
        if len(st.recent) > RECENT:
            st.recent.popitem(last=False)
        try:
            ts, events, _ = decode_payload(payload, inst.skipped)
        except EventDecodeError as exc:
            st.bad += 1
            log.warning("agent: %s: bad KV-event message: %s", inst.name, exc)
            return
        inst.last_event = time.time()
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            # engine clock to our reception: delivery lag (clocks may differ)
            inst.lag = max(inst.last_event - ts, 0.0)
        b = self.opts.block_size
        for ev in events:
            inst.events += 1
            if ev[0] == "stored":
                _, keys, parent, tokens, e = ev
                if e % b and b % e:
                    inst.skipped["block_size"] = inst.skipped.get("block_size", 0) + 1
                    continue
                inst.engine_bs = e
                anchor, lead = parent, ()
                if inst.chains.needed(e):
                    cut = inst.chains.stored(keys, parent, tokens, e)
                    if cut is None:
                        inst.skipped["unplaceable"] = inst.skipped.get("unplaceable", 0) + 1
                        continue
                    anchor, lead = cut
                self.batch.store(inst.name, e, keys, tokens, anchor, lead)
            elif ev[0] == "removed":
                if ev[1]:
                    inst.chains.removed(ev[1])
                    self.batch.remove(inst.name, inst.engine_bs or b, ev[1])
            else:
                inst.chains.clear()
                self.batch.clear(inst.name)
                # the engine's cache is empty: known again
                st.approx_since = None

    # -- metrics and health ------------------------------------------------------------
    async def _get(self, url, timeout):
        async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            body = await r.read()
            return r.status, body

    async def _metrics_loop(self, inst):
        while True:
            try:
                status, body = await self._get(inst.spec.url + "/metrics",
                                               self.opts.health_timeout)
                if status != 200:
                    raise ValueError(f"HTTP {status}")
                m = parse_metrics(body.decode("utf-8", "replace"))
                if m.engine == "sglang" and inst.sglang_capacity is None:
                    inst.sglang_capacity = await self._sglang_capacity(inst)
                cap = m.capacity_tokens if m.capacity_tokens else inst.sglang_capacity
                self.batch.metrics(inst.name, running=m.running, waiting=m.waiting,
                                   kv_usage=m.kv_usage, capacity_tokens=cap)
                inst.last_scrape = time.time()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError,
                    UnicodeError) as exc:
                inst.scrape_errors += 1
                log.debug("agent: %s: /metrics: %s", inst.name, exc)
            await asyncio.sleep(self.opts.metrics_interval)

    async def _sglang_capacity(self, inst):
        """SGLang's /metrics has no capacity; its server info does."""
        try:
            status, body = await self._get(inst.spec.url + "/get_server_info",
                                           self.opts.health_timeout)
            v = json.loads(body).get("max_total_num_tokens") if status == 200 else None
            return int(v) if isinstance(v, (int, float)) and v > 0 else 0
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            return 0

    async def _health_loop(self, inst):
        """Probes start on a fixed period, whatever the last one is doing: a
        hung engine's probe runs to its timeout while the next ones start,
        so an instance is down or back within `fall`/`rise` periods of the
        change (plus one answer), not periods stretched by timeouts.  A
        probe's result counts only if no newer probe has counted yet."""
        period = self.opts.health_interval
        probes = set()
        try:
            next_at = time.monotonic()
            while True:
                inst.probes += 1
                t = asyncio.get_running_loop().create_task(
                    self._probe(inst, inst.probes))
                probes.add(t)
                t.add_done_callback(probes.discard)
                next_at += period
                delay = next_at - time.monotonic()
                if delay < 0:       # fell behind (a stalled loop): no burst
                    next_at = time.monotonic()
                    delay = 0
                await asyncio.sleep(delay)
        finally:
            for t in list(probes):
                t.cancel()

    async def _probe(self, inst, seq):
        try:
            status, _ = await self._get(inst.spec.url + "/health",
                                        self.opts.health_timeout)
            ok = status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if seq <= inst.probe_applied:
            return                  # a newer probe already spoke
        inst.probe_applied = seq
        self.probe_result(inst, ok)

    def probe_result(self, inst, ok):
        """One health observation (a probe; passive failures may call it too)."""
        if ok:
            inst.health_ok += 1
            inst.health_fail = 0
            if inst.health != "up" and inst.health_ok >= self.opts.rise:
                inst.health = "up"
                inst.probe_flip = inst.probe_applied
        else:
            inst.health_fail += 1
            inst.health_ok = 0
            if inst.health != "down" and inst.health_fail >= self.opts.fall:
                inst.health = "down"
                inst.probe_flip = inst.probe_applied
        self._send_state(inst)
