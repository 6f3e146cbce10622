"""The step-based engine model of one simulated instance.

One asyncio task per instance runs the scheduler loop, like vLLM's engine core:
form a batch (running requests first: decodes and unfinished prefill chunks;
then waiting requests while `max_num_seqs` and the token budget
`max_num_batched_tokens` allow), allocate KV blocks (prefix-cache hits are
reused, LRU eviction of unreferenced cached blocks, preemption of the most
recently admitted request when blocks run out), compute the step's duration
from the cost model (presets.py), sleep once for the whole batch on the event
loop's clock, then advance every request in the batch and emit its token.
There is never one timer per request.

Requests whose KV comes from another instance (P/D decode) are admitted with
their blocks allocated, wait in LOADING while their `loader` coroutine fetches
the KV, and then decode without recomputing the prompt.
"""

import asyncio
import random
import time
import zlib
from array import array
from collections import deque

from .kvcache import BlockPool, prompt_block_hashes
from .metrics import Histogram, TTFT_BUCKETS, ITL_BUCKETS, E2E_BUCKETS
from .presets import step_time

WAITING, LOADING, RUNNING, FINISHED = "waiting", "loading", "running", "finished"
_MASK = (1 << 64) - 1


class Seq:
    """One engine request (one prompt)."""

    __slots__ = (
        "rid", "xrid", "tokens", "prompt_len", "max_tokens", "min_tokens",
        "ignore_eos", "eos_at", "force_eos_first", "output", "num_computed",
        "blocks", "hashes", "num_hashed", "status", "cached_tokens",
        "admitted", "finish_reason", "error", "arrival", "arrival_wall",
        "sched_time", "first_token_time", "last_token_time", "finish_time",
        "listener", "hold_blocks", "loader", "seed", "preemptions", "remote",
        "kind", "info", "tokenize_s",
    )

    def __init__(self, rid, prompt, max_tokens, min_tokens=0, ignore_eos=False,
                 eos_at=None, force_eos_first=False, xrid=None, kind="local"):
        self.rid = rid
        self.xrid = xrid
        self.tokens = list(prompt)
        self.prompt_len = len(self.tokens)
        self.tokenize_s = 0.0     # the front end's tokenizing before it arrived here
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.ignore_eos = ignore_eos
        self.eos_at = eos_at
        self.force_eos_first = force_eos_first
        self.output = []
        self.num_computed = 0
        self.blocks = []
        self.hashes = []
        self.num_hashed = 0
        self.status = WAITING
        self.cached_tokens = 0
        self.admitted = False
        self.finish_reason = None
        self.error = None
        self.arrival = self.sched_time = None
        self.arrival_wall = None
        self.first_token_time = self.last_token_time = self.finish_time = None
        self.listener = None
        self.hold_blocks = False
        self.loader = None
        self.seed = zlib.crc32(array("I", self.tokens).tobytes())
        self.preemptions = 0
        self.remote = None
        self.kind = kind
        self.info = {}

    @property
    def num_tokens(self):
        return len(self.tokens)

    @property
    def finished(self):
        return self.status == FINISHED

    def record(self):
        """Per-request timings for /sim/stats?requests=N (seconds)."""
        def rel(t):
            return None if t is None or self.arrival is None else round(t - self.arrival, 6)
        return {
            "id": self.rid, "x_request_id": self.xrid, "kind": self.kind,
            "arrival_unix": self.arrival_wall,
            "prompt_tokens": self.prompt_len, "cached_tokens": self.cached_tokens,
            "output_tokens": len(self.output), "finish_reason": self.finish_reason,
            "error": self.error, "preemptions": self.preemptions,
            "queue_s": rel(self.sched_time), "ttft_s": rel(self.first_token_time),
            "e2e_s": rel(self.finish_time),
            "tokenize_s": round(self.tokenize_s, 6),
        }


class Engine:
    def __init__(self, preset, tokenizer, salt, speedup=1.0, seed=0,
                 eos_rate=0.0, recent=1000):
        self.p = preset
        self.tok = tokenizer
        self.salt = salt
        self.speedup = speedup
        self.eos_rate = eos_rate
        self.rng = random.Random(seed)
        self.bs = preset.block_size
        self.pool = BlockPool(preset.num_blocks, preset.block_size)
        self.waiting = deque()
        self.running = []
        self.loading = set()
        self.slow_factor = 1.0
        self.event_sink = None
        self._wake = asyncio.Event()
        self._task = None
        self.recent = deque(maxlen=recent)
        # counters
        self.requests_total = 0
        self.requests_finished = 0
        self.errors_total = 0
        self.aborted_total = 0
        self.prefix_queried = 0
        self.prefix_hits = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.preemptions_total = 0
        self.steps_total = 0
        self.busy_time = 0.0
        self.last_step = None
        self.busy_until = 0.0
        self.max_waiting_seen = 0
        self.max_running_seen = 0
        self.finished_by_reason = {}
        # front end: tokenization (server.py charges it, counts parity)
        self.tokenized_tokens = 0
        self.tokenize_skipped_tokens = 0
        self.tokenize_time = 0.0
        self.token_parity_checked = 0
        self.token_parity_mismatches = 0
        self.h_ttft = Histogram(TTFT_BUCKETS)
        self.h_itl = Histogram(ITL_BUCKETS)
        self.h_e2e = Histogram(E2E_BUCKETS)
        self.h_queue = Histogram(E2E_BUCKETS)

    # -- lifecycle -------------------------------------------------------
    def start(self):
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # -- requests --------------------------------------------------------
    @property
    def num_waiting(self):
        return len(self.waiting) + len(self.loading)

    def add(self, seq):
        loop = asyncio.get_running_loop()
        seq.arrival = loop.time()
        seq.arrival_wall = time.time()
        if seq.loader is None:
            seq.hashes = prompt_block_hashes(seq.tokens, self.bs, self.salt)
        self.requests_total += 1
        self.prompt_tokens_total += seq.prompt_len
        self.waiting.append(seq)
        n = self.num_waiting
        if n > self.max_waiting_seen:
            self.max_waiting_seen = n
        self._wake.set()

    def fail(self, seq, message):
        """End a request with an error (it leaves every queue, frees its KV)."""
        if seq.status == FINISHED:
            return
        self._drop(seq)
        seq.error = message
        seq.finish_reason = "error"
        self.errors_total += 1
        self._close(seq)

    def abort(self, seq):
        """The client went away."""
        if seq.status == FINISHED:
            return
        self._drop(seq)
        seq.finish_reason = "abort"
        self.aborted_total += 1
        self._close(seq)

    def release_held(self, seq):
        """Free the blocks a finished P/D prefill kept for its decode peer."""
        if seq.blocks:
            self.pool.release(seq.blocks)
            seq.blocks = []
            self._wake.set()

    def reset_prefix_cache(self):
        self.pool.reset()
        self._publish()

    def cached_prefix_tokens(self, tokens):
        """Tokens of `tokens` this instance holds in its prefix cache now
        (no side effects; for oracle-style yardsticks)."""
        hashes = prompt_block_hashes(tokens[:max(len(tokens) - 1, 0)], self.bs, self.salt)
        return len(self.pool.match_prefix(hashes)) * self.bs

    # -- internals -------------------------------------------------------
    def _drop(self, seq):
        if seq.status == WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif seq.status == RUNNING:
            try:
                self.running.remove(seq)
            except ValueError:
                pass
        elif seq.status == LOADING:
            self.loading.discard(seq)
            task = seq.info.pop("load_task", None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if seq.blocks:
            self.pool.release(seq.blocks)
            seq.blocks = []
        self._wake.set()

    def _close(self, seq):
        seq.status = FINISHED
        seq.finish_time = asyncio.get_running_loop().time()
        self.recent.append(seq)
        if seq.listener is not None:
            seq.listener(seq)

    def _notify(self, seq):
        if seq.listener is not None:
            seq.listener(seq)

    def _next_token(self, seq, idx):
        if idx == 0 and seq.force_eos_first:
            return self.tok.eos_id
        if not seq.ignore_eos and idx >= seq.min_tokens:
            if seq.eos_at is not None and idx + 1 >= seq.eos_at:
                return self.tok.eos_id
            if self.eos_rate > 0.0:
                x = ((seq.seed + 0x632BE59BD9B4E019) * (idx + 1)) & _MASK
                x ^= x >> 29
                if (x % 1000003) / 1000003.0 < self.eos_rate:
                    return self.tok.eos_id
        x = (seq.seed ^ ((idx + 1) * 0x9E3779B97F4A7C15)) & _MASK
        x = (x * 0xBF58476D1CE4E5B9) & _MASK
        x ^= x >> 31
        gen = self.tok.gen_ids
        return gen[x % len(gen)]

    def _emit(self, seq, now):
        idx = len(seq.output)
        tok = self._next_token(seq, idx)
        seq.output.append(tok)
        seq.tokens.append(tok)
        self.generation_tokens_total += 1
        if idx == 0:
            seq.first_token_time = now
            self.h_ttft.observe(now - seq.arrival)
        else:
            self.h_itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        reason = None
        if tok == self.tok.eos_id and (not seq.ignore_eos or (idx == 0 and seq.force_eos_first)):
            reason = "stop"
        elif len(seq.output) >= seq.max_tokens or len(seq.tokens) >= self.p.max_model_len:
            reason = "length"
        if reason is None:
            self._notify(seq)
            return False
        seq.finish_reason = reason
        if not (seq.hold_blocks and (reason == "length" or seq.kind == "bootstrap")):
            self.pool.release(seq.blocks)
            seq.blocks = []
        self.requests_finished += 1
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        self.h_e2e.observe(now - seq.arrival)
        self._close(seq)
        return True

    def _cache_blocks(self, seq):
        bs = self.bs
        full = seq.num_computed // bs
        if full <= seq.num_hashed:
            return
        if len(seq.hashes) < full:
            start = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            seq.hashes.extend(prompt_block_hashes(
                seq.tokens[start * bs:full * bs], bs, self.salt, parent))
        pool = self.pool
        run_start = None
        i = seq.num_hashed
        while i < full:
            if pool.register(seq.blocks[i], seq.hashes[i]):
                if run_start is None:
                    run_start = i
            elif run_start is not None:
                self._stored(seq, run_start, i)
                run_start = None
            i += 1
        if run_start is not None:
            self._stored(seq, run_start, full)
        seq.num_hashed = full

    def _stored(self, seq, i0, i1):
        bs = self.bs
        self.pool.events.append((
            "stored", seq.hashes[i0:i1],
            seq.hashes[i0 - 1] if i0 > 0 else None,
            seq.tokens[i0 * bs:i1 * bs]))

    def _publish(self):
        ev = self.pool.take_events()
        if ev and self.event_sink is not None:
            self.event_sink(ev)

    def _preempt(self, seq):
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_hashed = 0
        seq.status = WAITING
        seq.preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(seq)

    def _schedule(self):
        p, bs, pool = self.p, self.bs, self.pool
        budget = p.max_num_batched_tokens
        batch = []
        preempted = False
        i = 0
        running = self.running
        while i < len(running) and budget > 0:
            s = running[i]
            n = min(s.num_tokens - s.num_computed, budget)
            need = -(-(s.num_computed + n) // bs) - len(s.blocks)
            while need > pool.num_free():
                victim = running[-1]
                self._preempt(victim)
                preempted = True
                if victim is s:
                    break
            if s.status != RUNNING:
                break
            if need > 0:
                s.blocks.extend(pool.allocate(need))
            batch.append((s, n))
            budget -= n
            i += 1
        waiting = self.waiting
        while waiting and budget > 0 and not preempted:
            s = waiting[0]
            if s.loader is not None and s.remote is None:
                # remote KV: allocate the prompt's blocks, then fetch
                need = -(-s.prompt_len // bs)
                if need > pool.num_free():
                    break
                waiting.popleft()
                s.blocks = pool.allocate(need)
                s.status = LOADING
                s.remote = "loading"
                self.loading.add(s)
                s.info["load_task"] = asyncio.get_running_loop().create_task(self._load(s))
                continue
            if len(running) >= p.max_num_seqs:
                break
            hit = []
            comp = s.num_computed
            if not s.blocks:
                hit = pool.match_prefix(s.hashes[:(s.num_tokens - 1) // bs])
                comp = len(hit) * bs
            n = min(s.num_tokens - comp, budget)
            need = -(-(comp + n) // bs) - (len(s.blocks) or len(hit))
            if need > pool.num_free() - pool.free_among(hit):
                break
            waiting.popleft()
            if hit:
                pool.touch(hit)
                s.blocks = list(hit)
                s.num_hashed = len(hit)
            if need > 0:
                s.blocks.extend(pool.allocate(need))
            s.num_computed = comp
            if not s.admitted:
                s.admitted = True
                s.sched_time = asyncio.get_running_loop().time()
                self.h_queue.observe(s.sched_time - s.arrival)
                if s.remote is None:
                    s.cached_tokens = comp
                    self.prefix_queried += s.prompt_len
                    self.prefix_hits += comp
            s.status = RUNNING
            running.append(s)
            batch.append((s, n))
            budget -= n
        if len(running) > self.max_running_seen:
            self.max_running_seen = len(running)
        return batch

    def _step_time(self, batch):
        prefill = pairs = decodes = kv = 0
        for s, n in batch:
            if s.num_computed >= s.prompt_len and n == 1:
                decodes += 1
                kv += s.num_computed
            else:
                prefill += n
                pairs += n * (s.num_computed + n / 2.0)
        t = step_time(self.p, prefill, pairs, decodes, kv)
        if self.p.jitter:
            t *= max(0.1, self.rng.gauss(1.0, self.p.jitter))
        self.last_step = {"seqs": len(batch), "prefill_tokens": prefill,
                          "decodes": decodes, "model_s": t}
        return t * self.slow_factor / self.speedup

    def _advance(self, batch, now):
        finished = False
        for s, n in batch:
            if s.status != RUNNING:
                continue
            s.num_computed += n
            self._cache_blocks(s)
            if s.num_computed >= s.num_tokens:
                if self._emit(s, now):
                    finished = True
        if finished:
            self.running = [s for s in self.running if s.status == RUNNING]
        self._publish()

    async def _load(self, seq):
        try:
            first = await seq.loader(seq)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # the transfer failed: an error, never a recompute
            if seq.status == LOADING:
                self.fail(seq, str(exc) or exc.__class__.__name__)
            return
        if seq.status != LOADING:
            return
        self.loading.discard(seq)
        seq.remote = "loaded"
        now = asyncio.get_running_loop().time()
        if first is None:
            seq.num_computed = seq.prompt_len - 1
        else:
            seq.num_computed = seq.prompt_len
        seq.hashes = prompt_block_hashes(seq.tokens[:seq.prompt_len], self.bs, self.salt)
        self._cache_blocks(seq)
        self._publish()
        seq.status = WAITING
        if first is not None:
            seq.output.append(first)
            seq.tokens.append(first)
            self.generation_tokens_total += 1
            seq.first_token_time = seq.last_token_time = now
            self.h_ttft.observe(now - seq.arrival)
            reason = None
            if first == self.tok.eos_id and not seq.ignore_eos:
                reason = "stop"
            elif len(seq.output) >= seq.max_tokens:
                reason = "length"
            if reason is not None:
                self.pool.release(seq.blocks)
                seq.blocks = []
                seq.finish_reason = reason
                self.requests_finished += 1
                self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
                self.h_e2e.observe(now - seq.arrival)
                self._close(seq)
                self._wake.set()
                return
            self._notify(seq)
        self.waiting.appendleft(seq)
        self._wake.set()

    async def _run(self):
        loop = asyncio.get_running_loop()
        chained = False
        while True:
            now = loop.time()
            # Back-to-back steps follow the planned timeline, so timer
            # overshoot (epoll rounds to 1 ms) does not accumulate.
            t0 = min(now, self.busy_until) if chained else now
            batch = self._schedule()
            if not batch:
                chained = False
                self._wake.clear()
                await self._wake.wait()
                continue
            chained = True
            dur = self._step_time(batch)
            self.busy_until = t0 + dur
            self.steps_total += 1
            self.busy_time += dur
            delay = t0 + dur - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            self._advance(batch, loop.time())
