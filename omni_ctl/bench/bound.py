"""Clairvoyant schedules of a run's requests: how far a router is from what
the same cluster could do with the same requests.

A discrete-event model, computed offline, of the simulator's engines
(omni_ctl/sim/engine.py) fed by one central queue that knows every request's
exact prompt, cache hit and output length in advance:

  sjf   non-preemptive shortest job first: the waiting request whose prefill
        alone takes least goes first; once its first chunk ran it runs to the
        end on that instance
  fcfs  the same, oldest first
  srpt  preemptive shortest remaining prefill first, decided again at every
        step, and a prefill between two chunks may continue on any instance
        (its KV moves for free): the optimistic one, the lower bound

Each instance is the simulator's step loop: a step takes the instance's
running work first (decodes; sjf/fcfs: unfinished prefill chunks), then
requests from the central queue in the policy's order while the step's token
budget (max_num_batched_tokens) and seats (max_num_seqs) allow; it lasts the
preset's step_time / speedup. The first prefill of a step may be a chunk of
a longer prompt; after it a request joins the step only if it completes in
it (a longer one's chunk would lengthen the step for everything in it), and
only while the queue holds more requests than there are other idle
instances. An instance takes work whenever it starts a step, so a request
binds to the instance that frees first (among idle ones, the one idle
longest).

Decode tier, sequential P/D (vLLM protocol): a finished prefill goes to the
decode instance with the fewest tokens; that engine starts pulling the KV at
its next step boundary, the pull lasts the preset's transfer time, and the
next step computes the last prompt token and emits the first token. Parallel
P/D (SGLang): the first token comes with the KV, a transfer after the
prefill. Aggregated: the first token ends the prefill, and decodes share the
instance's steps.

With batching and several instances none of the three dominates the others
request by request, nor always in the mean: a non-preemptive order can block
every instance with long prompts at the wrong moment, and a step shared with
a longer prompt is longer. On a loaded trace SRPT < SJF < FCFS in the mean
by wide margins; on small random cases either inversion shows up, by a few
percent (tests/test_bench_bound.py).

A prompt the engines got as text waits for their front end's tokenization
(the preset's tokenize cost per token, the time the simulator recorded for
it) before its prefill can be scheduled, and in sequential P/D again before
its decode leg is: a delay per request, without the queueing of the
engines' one tokenizer lane each (so still optimistic). A prompt sent as
token ids has none.

Not modelled: KV memory (no eviction, no preemption), step-time jitter, the
HTTP hops (client, router, engines). Each request gets the cache hit the
simulator reported for it in the run the bound is computed for, wherever the
model places it and whatever ran before it: the bounds assume the placement
got every hit that run got.

An instrument: it uses the simulator's cost model (omni_ctl.sim.presets) and
never imports the proxy's scoring library or any of the proxy's code.
"""

from __future__ import annotations

import heapq
import json
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass

from .errors import BenchError
from .metrics import stats

POLICIES = ("sjf", "fcfs", "srpt")
MODES = ("sequential", "parallel", "aggregated")
LABELS = {"sjf": "bound: SJF (clairvoyant, non-preemptive)",
          "fcfs": "bound: FCFS (clairvoyant, central queue)",
          "srpt": "bound: SRPT (preemptive, lower bound)"}
SHORT = {"sjf": "SJF", "fcfs": "FCFS", "srpt": "SRPT"}


@dataclass(frozen=True)
class Job:
    """One request as the model sees it (times in seconds)."""
    arrival: float
    prompt: int          # prompt tokens
    cached: int = 0      # of them, held by the prefill instance (prefix-cache hit)
    output: int = 1      # output tokens
    # the engines' front ends tokenizing a text prompt before it can be
    # scheduled (0 for a prompt sent as ids): on the prefill leg, and on the
    # decode leg of sequential P/D (the simulator's records, `tokenize_s`)
    tokenize: float = 0.0
    tokenize_decode: float = 0.0


@dataclass(frozen=True)
class Cluster:
    """The simulated cluster: preset (omni_ctl.sim.presets.Preset), instance
    counts, P/D mode and the simulator's --speedup. Aggregated: `prefill`
    instances do both."""
    preset: object
    prefill: int = 1
    decode: int = 1
    mode: str = "sequential"
    speedup: float = 1.0

    def describe(self) -> str:
        p = self.preset
        tiers = (f"{self.prefill} instances" if self.mode == "aggregated"
                 else f"{self.prefill}P+{self.decode}D")
        return (f"{tiers}, {self.mode}, preset {p.name}, speedup {self.speedup:g}, "
                f"budget {p.max_num_batched_tokens} tokens, {p.max_num_seqs} seats")


def _step_time():
    from omni_ctl.sim.presets import step_time
    return step_time


def prefill_alone(cluster: Cluster, tokens: int, ctx: int) -> float:
    """Seconds to prefill `tokens` after `ctx` cached ones on an otherwise
    idle instance: chunks of the step budget, each step's cost by the preset."""
    p, step_time, t = cluster.preset, _step_time(), 0.0
    while tokens > 0:
        k = min(tokens, p.max_num_batched_tokens)
        t += step_time(p, k, k * (ctx + k / 2.0), 0, 0)
        ctx += k
        tokens -= k
    return t / cluster.speedup


class _Seq:
    """One engine leg of a job: the prefill (or the whole request when
    aggregated) or the decode leg."""

    __slots__ = ("i", "job", "total", "computed", "emitted", "max_out", "loaded",
                 "inst")

    def __init__(self, i, job, max_out):
        self.i, self.job, self.max_out = i, job, max_out
        self.total = job.prompt        # tokens it has: prompt + outputs so far
        self.computed = job.cached
        self.emitted = 0
        self.loaded = False
        self.inst = None


class _Inst:
    __slots__ = ("idx", "running", "waiting", "batch", "idle_since", "tokens")

    def __init__(self, idx):
        self.idx = idx
        self.running = []            # admitted, unfinished
        self.waiting = deque()       # decode tier: legs to load, then loaded ones
        self.batch = None            # the step in flight: [(seq, tokens)]
        self.idle_since = 0.0
        self.tokens = 0              # decode tier: prompt + output of its legs


class _Model:
    def __init__(self, jobs, cluster, policy, engine_admission=False):
        if policy not in POLICIES:
            raise BenchError(f"unknown bound policy {policy!r} (known: {', '.join(POLICIES)})")
        if cluster.mode not in MODES:
            raise BenchError(f"unknown P/D mode {cluster.mode!r} (known: {', '.join(MODES)})")
        if cluster.prefill < 1 or (cluster.mode != "aggregated" and cluster.decode < 1):
            raise BenchError(f"the model needs instances on every tier: {cluster.describe()}")
        if not cluster.speedup > 0:
            raise BenchError(f"speedup must be > 0, got {cluster.speedup}")
        p = cluster.preset
        for j in jobs:
            if j.prompt < 1 or j.output < 1 or not 0 <= j.cached < j.prompt:
                raise BenchError(f"bad job {j}: needs prompt >= 1, output >= 1 and "
                                 f"0 <= cached < prompt")
        self.jobs, self.policy, self.p, self.cluster = jobs, policy, p, cluster
        self.speedup = cluster.speedup
        self.agg = cluster.mode == "aggregated"
        self.parallel = cluster.mode == "parallel"
        self.budget, self.seats = p.max_num_batched_tokens, p.max_num_seqs
        self.step_time = _step_time()
        self.pre = [_Inst(i) for i in range(cluster.prefill)]
        self.dec = [] if self.agg else [_Inst(i) for i in range(cluster.decode)]
        self.queue = []              # central heap: (key, n, seq)
        self.events = []             # heap: (t, n, kind, inst, seq)
        self.n = 0
        self.reserve = 0             # queued requests left for other idle instances
        # fill every step's budget with chunks in queue order, as the engine
        # admits its own waiting requests (tests of the step model)
        self.engine_admission = engine_admission
        self.ttft = [None] * len(jobs)

    # -- the cost model ---------------------------------------------------------
    def alone(self, tokens, ctx):
        return prefill_alone(self.cluster, tokens, ctx)

    def transfer(self, job):
        p = self.p
        return (p.kv_transfer_base + p.kv_transfer_per_token * job.prompt) / self.speedup

    def _key(self, s):
        if self.policy == "fcfs":
            return s.job.arrival
        return self.alone(s.job.prompt - s.computed, s.computed)

    # -- events -------------------------------------------------------------------
    def _at(self, t, kind, inst=None, seq=None):
        self.n += 1
        heapq.heappush(self.events, (t, self.n, kind, inst, seq))

    def _enqueue(self, s):
        self.n += 1
        heapq.heappush(self.queue, (self._key(s), self.n, s))

    def run(self):
        for i, j in enumerate(self.jobs):
            self._at(j.arrival + j.tokenize, "arrive",
                     seq=_Seq(i, j, j.output if self.agg else 1))
        ev = self.events
        while ev:
            t = ev[0][0]
            while ev and ev[0][0] == t:      # everything of this instant, then steps
                _, _, kind, inst, seq = heapq.heappop(ev)
                getattr(self, "_on_" + kind)(t, inst, seq)
            self._kick(t)
        return self.ttft

    def _on_arrive(self, t, inst, s):
        self._enqueue(s)

    def _on_step(self, t, inst, seq):
        batch, inst.batch = inst.batch, None
        inst.idle_since = t
        for s, n in batch:
            s.computed += n
            if s.computed >= s.total:
                self._emit(inst, s, t)
            elif self.policy == "srpt" and s.computed < s.job.prompt:
                inst.running.remove(s)   # between chunks: back to the queue
                self._enqueue(s)

    def _on_decode(self, t, inst, s):
        """A finished prefill's decode leg reaches the decode tier."""
        d = _Seq(s.i, s.job, s.job.output)
        d.computed = 0
        if self.parallel:
            d.computed, d.total, d.emitted, d.loaded = d.job.prompt, d.job.prompt + 1, 1, True
        inst = min(self.dec, key=lambda x: (x.tokens, x.idx))
        inst.tokens += d.job.prompt + d.job.output
        d.inst = inst
        if d.emitted >= d.max_out:
            inst.tokens -= d.job.prompt + d.job.output
            return
        inst.waiting.append(d)

    def _on_loaded(self, t, inst, d):
        d.computed, d.loaded = d.job.prompt - 1, True
        inst.waiting.appendleft(d)

    def _emit(self, inst, s, t):
        s.emitted += 1
        s.total += 1
        decode_leg = s.inst is not None and s.inst in self.dec
        if s.emitted == 1:
            if self.agg or decode_leg:
                self.ttft[s.i] = t - s.job.arrival
            elif self.parallel:
                self.ttft[s.i] = t + self.transfer(s.job) - s.job.arrival
                self._at(t + self.transfer(s.job), "decode", seq=s)
            else:
                self._at(t + s.job.tokenize_decode, "decode", seq=s)
        if s.emitted >= s.max_out:
            if s.inst is not None:
                s.inst.running.remove(s)
                if decode_leg:
                    s.inst.tokens -= s.job.prompt + s.job.output

    # -- steps ----------------------------------------------------------------------
    def _kick(self, t):
        idle = sorted((x for x in self.pre if x.batch is None),
                      key=lambda x: (x.idle_since, x.idx))
        for k, inst in enumerate(idle):
            if inst.running or self.queue:
                # a request for each idle instance after this one
                self.reserve = sum(1 for x in idle[k + 1:] if not x.running)
                self._start(inst, t, self._pull_central)
        for inst in self.dec:
            if inst.batch is None and (inst.running or inst.waiting):
                self._start(inst, t, self._pull_local)

    def _start(self, inst, t, pull):
        batch, budget = [], self.budget
        # running work first (srpt: only decodes; its prefills between two
        # chunks are back in the queue)
        for s in inst.running:
            if budget <= 0:
                break
            n = min(s.total - s.computed, budget)
            batch.append((s, n))
            budget -= n
        pull(inst, t, batch, budget)
        if not batch:
            return
        inst.batch = batch
        prefill = pairs = decodes = kv = 0
        for s, n in batch:
            if s.computed >= s.job.prompt and n == 1:
                decodes += 1
                kv += s.computed
            else:
                prefill += n
                pairs += n * (s.computed + n / 2.0)
        dur = self.step_time(self.p, prefill, pairs, decodes, kv) / self.speedup
        self._at(t + dur, "step", inst)

    def _pull_central(self, inst, t, batch, budget):
        """Requests from the central queue, in the policy's order. The first
        prefill of a step may be a chunk; after it, a request joins only if
        it completes in this step (a longer one's chunk would lengthen the
        step of everything in it; it can start when an instance frees) and
        the queue keeps one for each other idle instance."""
        q = self.queue
        has_prefill = any(s.computed < s.job.prompt for s, _ in batch)
        while budget > 0 and q and len(inst.running) < self.seats:
            s = self._next_central(t)
            rest = s.total - s.computed
            if has_prefill and not self.engine_admission \
                    and (rest > budget or len(q) <= self.reserve):
                break
            self._take_central(s)
            s.inst = inst
            inst.running.append(s)
            n = min(rest, budget)
            batch.append((s, n))
            budget -= n
            has_prefill = True

    def _next_central(self, t):
        """The sequence the central queue starts next: the least key (the
        what-ifs in docs/bench-notes/ put other rules here)."""
        return self.queue[0][2]

    def _take_central(self, s):
        heapq.heappop(self.queue)

    def _pull_local(self, inst, t, batch, budget):
        w = inst.waiting
        while w and budget > 0:
            d = w[0]
            if not d.loaded:             # the engine starts the KV pull now
                w.popleft()
                self._at(t + self.transfer(d.job), "loaded", inst, d)
                continue
            if len(inst.running) >= self.seats:
                break
            w.popleft()
            inst.running.append(d)
            n = min(d.total - d.computed, budget)
            batch.append((d, n))
            budget -= n


def simulate(jobs, cluster: Cluster, policy: str, engine_admission=False) -> list[float]:
    """Each job's TTFT in seconds (from its arrival) under `policy`. With
    engine_admission, steps are filled as the simulator's engine fills them
    from its own queue (no holding back of chunks or of requests for other
    idle instances): with fcfs and one instance, the engine itself."""
    return _Model(list(jobs), cluster, policy, engine_admission).run()


def alone_ttft(job: Job, cluster: Cluster) -> float:
    """A job's TTFT on an idle cluster (seconds)."""
    return simulate([Job(0.0, job.prompt, job.cached, job.output, job.tokenize,
                         job.tokenize_decode)], cluster, "fcfs")[0]


# --- the run a bound is computed for ---------------------------------------------

def sim_requests(url: str, timeout: float = 10.0) -> dict:
    """Every instance's per-request records (GET /sim/stats?requests=N, the
    simulator keeps the last 1000 per instance) and its preset."""
    from .simstats import stats_url
    u = stats_url(url) + "?requests=1000"
    try:
        with urllib.request.urlopen(u, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise BenchError(f"GET {u} failed: {exc}") from None
    keep = ("name", "role", "engine", "url", "preset", "speedup", "block_size",
            "num_blocks", "requests")
    return {"instances": [{k: i.get(k) for k in keep} for i in data.get("cluster", [])]}


PREFILL_KINDS = ("local", "kv_producer", "bootstrap")


def prefill_records(sim: dict | None) -> dict:
    """x_request_id -> the simulator's record of that request's prefill (the
    last one that did not fail), with the instance's name added."""
    out = {}
    for inst in (sim or {}).get("instances", []):
        if inst.get("role") == "decode":
            continue
        for r in inst.get("requests") or ():
            if r.get("kind") in PREFILL_KINDS and r.get("x_request_id") and not r.get("error"):
                out[r["x_request_id"]] = dict(r, instance=inst.get("name"))
    return out


def decode_records(sim: dict | None) -> dict:
    """x_request_id -> the simulator's record of the decode leg (P/D)."""
    out = {}
    for inst in (sim or {}).get("instances", []):
        for r in inst.get("requests") or ():
            if r.get("kind") in ("kv_consumer", "boot_decode") and r.get("x_request_id") \
                    and not r.get("error"):
                out[r["x_request_id"]] = dict(r, instance=inst.get("name"))
    return out


def sim_options(sim_args) -> dict | None:
    """`omni-ctl sim` options, parsed by the simulator's own command (None
    when there are none)."""
    args = list(sim_args or ())
    if not args:
        return None
    from omni_ctl.sim.cli import sim as sim_command
    try:
        return sim_command.make_context("sim", ["--base-port", "1", *args]).params
    except Exception as exc:     # click's usage errors
        raise BenchError(f"--sim-args {' '.join(args)}: {exc}") from None


def cluster_for(sim: dict, sim_args=()) -> Cluster:
    """The cluster of a run from the simulator's own report (roles, engine,
    preset, speedup), with the limits `omni-ctl sim` was given (--sim-args of
    compare) applied through the simulator's own option parser."""
    from omni_ctl.sim.presets import get_preset
    insts = sim.get("instances") or []
    if not insts:
        raise BenchError("the simulator reported no instances")
    roles = [i.get("role") for i in insts]
    first = insts[0]
    try:
        preset = get_preset(first.get("preset"))
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    speedup = float(first.get("speedup") or 1.0)
    params = sim_options(sim_args)
    if params:
        preset = preset.with_overrides(
            num_blocks=params["num_blocks"], block_size=params["block_size"],
            max_num_seqs=params["max_num_seqs"],
            max_num_batched_tokens=params["max_num_batched_tokens"],
            max_model_len=params["max_model_len"])
    if "both" in roles:
        return Cluster(preset, prefill=roles.count("both"), decode=0, mode="aggregated",
                       speedup=speedup)
    mode = "parallel" if first.get("engine") == "sglang" else "sequential"
    return Cluster(preset, prefill=roles.count("prefill"), decode=roles.count("decode"),
                   mode=mode, speedup=speedup)


def _field(r, name):
    return r.get(name) if isinstance(r, dict) else getattr(r, name)


def jobs_for(records, sim: dict | None, run_id: str):
    """The completed requests of a run as Jobs: arrival = when the client
    sent it, prompt and cache hit from the simulator's record of its prefill
    (found by the id the engines saw: the proxy's X-Omni-Request-Id when the
    answer carried one, else the client's X-Request-Id RUN_ID-INDEX), output
    from the client. Returns
    (jobs, record indexes, how many lacked a simulator record)."""
    pre = prefill_records(sim)
    dec = decode_records(sim)
    jobs, idx, missing = [], [], 0
    for r in records:
        if not _field(r, "ok") or _field(r, "start_s") is None:
            continue
        key = _field(r, "engine_request_id") or f"{run_id}-{_field(r, 'index')}"
        rec = pre.get(key)
        if rec is None:
            missing += 1
            prompt = _field(r, "prompt_tokens") or _field(r, "prompt_len")
            cached = 0
        else:
            prompt, cached = int(rec["prompt_tokens"]), int(rec.get("cached_tokens") or 0)
        prompt = max(int(prompt or 1), 1)
        tok = float((rec or {}).get("tokenize_s") or 0.0)
        tok_dec = float((dec.get(key) or {}).get("tokenize_s") or 0.0)
        jobs.append(Job(float(_field(r, "start_s")), prompt, min(cached, prompt - 1),
                        max(int(_field(r, "output_tokens") or 1), 1), tok, tok_dec))
        idx.append(_field(r, "index"))
    return jobs, idx, missing


def compute(records, sim: dict | None, run_id: str, cluster: Cluster,
            source: str = "", policies=POLICIES) -> dict:
    """The bounds of one run: per policy, TTFT stats (ms) and per-request
    TTFTs, over the requests that run completed."""
    jobs, idx, missing = jobs_for(records, sim, run_id)
    if not jobs:
        raise BenchError("no completed request to compute a bound for")
    notes = []
    if missing:
        notes.append(f"{missing} of {len(jobs)} requests had no simulator record "
                     f"(their cache hit is taken as 0 and their prompt from the client)")
    out = {"source": source, "run_id": run_id, "cluster": cluster.describe(),
           "preset": asdict(cluster.preset), "mode": cluster.mode,
           "speedup": cluster.speedup, "requests": len(jobs),
           "cached_tokens": sum(j.cached for j in jobs),
           "prompt_tokens": sum(j.prompt for j in jobs),
           "notes": notes, "policies": {}}
    for pol in policies:
        ttft = simulate(jobs, cluster, pol)
        out["policies"][pol] = {
            "label": LABELS[pol],
            "ttft_ms": stats(t * 1000.0 for t in ttft),
            "requests": {str(i): round(t * 1000.0, 3) for i, t in zip(idx, ttft)}}
    return out


def brief(bounds: dict) -> dict:
    """The bounds without their per-request TTFTs."""
    return dict(bounds, policies={p: {"label": b["label"], "ttft_ms": b["ttft_ms"]}
                                  for p, b in bounds["policies"].items()})


def multiples(summary: dict, bounds: dict) -> dict:
    """A measured row's mean and p99 TTFT over each bound's."""
    out = {}
    for pol, b in bounds["policies"].items():
        for stat in ("mean", "p99"):
            m, ref = summary["ttft_ms"].get(stat), b["ttft_ms"].get(stat)
            out[f"{stat}/{pol}"] = m / ref if m is not None and ref else None
    return out
