"""`omni-ctl bench-lib`: speed and size of the scoring library.

Plain functions do the measuring (tests call them with small sizes); the
click command only formats.  Every timed loop calls the C library through the
raw cffi ``lib`` with buffers allocated beforehand; where a figure is small
enough for the Python call overhead to matter, that overhead (an empty
library call, measured in the same run) is reported next to it.

Clocks: rates summed over many calls (hashing, inserts, decisions) use this
thread's CPU time, so time the process spent descheduled on a shared machine
does not count; single match calls use the wall clock and report the median
and p99 (a preempted call is an outlier).  The load average is recorded with
the figures.

Figures (targets from issue 3 / issue 7):

- hashing rate, tokens/s (chained xxHash3 over 16-token blocks);
- insert rate, blocks/s (>= 2M): filling an empty index, inserting into a
  full one (every new block evicts one), and refreshing cached blocks;
- match time for a 32k-token prompt against 64 instances each holding 100k
  blocks (<= 100 us), with warm and with cold CPU caches;
- bytes per (block, instance) entry (<= 64);
- scheduling decision cost at 32 instances (<< 50 us);
- JSON scan+splice rate, from omni_ctl.bench.lib_json.
"""

import json
import os
import statistics
import time

import click

from ..scoring import PrefixIndex, Predictor, ffi, lib
from ..scoring.errors import check

__all__ = [
    "bench_hash",
    "build_index",
    "bench_match",
    "bench_insert_more",
    "bench_decision",
    "run_bench",
    "format_bench",
    "bench_lib",
]

BLOCK_SIZE = 16


def _ns():
    return time.perf_counter_ns()


def _cpu_ns():
    return time.thread_time_ns()


def _call_overhead_ns(reps=20000):
    """Median cost of one empty library call from Python, in ns."""
    f = lib.omni_version
    samples = []
    for _ in range(5):
        t0 = _ns()
        for _ in range(reps):
            f()
        samples.append((_ns() - t0) / reps)
    return statistics.median(samples)


def _random_tokens(n, rnd_bytes=os.urandom):
    buf = bytearray(rnd_bytes(4 * n))
    return ffi.from_buffer("uint32_t[]", buf), buf


def bench_hash(tokens=1 << 20, reps=20):
    """Chained block hashing over `tokens` random token ids, tokens/s."""
    arr, keep = _random_tokens(tokens)
    nb = tokens // BLOCK_SIZE
    out = ffi.new("uint64_t[]", nb)
    best = None
    for _ in range(reps):
        t0 = _cpu_ns()
        got = lib.omni_hash_blocks(arr, tokens, BLOCK_SIZE, 0, out, nb)
        dt = _cpu_ns() - t0
        assert got == nb
        best = dt if best is None else min(best, dt)
    del keep
    return {"tokens": tokens, "block_size": BLOCK_SIZE,
            "tokens_per_s": tokens / (best / 1e9)}


def build_index(instances=64, blocks_per_instance=100_000, prompt_tokens=32768,
                chunk_blocks=2048, progress=None, hugepages=False):
    """An index where every instance holds `blocks_per_instance` blocks.

    Instance i holds the first (i + 1) / instances of one long prompt (the one
    matched later: instance instances-1 holds all of it, so the match walks
    every block) and then distinct prompts of `chunk_blocks` blocks each until
    it is full, so the index is at capacity with no sharing beyond that prompt
    (the worst case for memory per entry).  Times the inserts.

    Returns (index, prompt (tokens, hashes) cdata, n_prompt_blocks, stats).
    """
    ix = PrefixIndex(instances, BLOCK_SIZE, blocks_per_instance,
                     hugepages=hugepages)
    h = ix._h
    nb = prompt_tokens // BLOCK_SIZE
    ptoks, pkeep = _random_tokens(prompt_tokens)
    phashes = ffi.new("uint64_t[]", nb)
    check(lib.omni_hash_blocks(ptoks, prompt_tokens, BLOCK_SIZE, 0, phashes,
                               nb))

    chunk = ffi.new("uint64_t[]", chunk_blocks)
    toks, tkeep = _random_tokens(chunk_blocks * BLOCK_SIZE)
    insert_ns = 0
    inserted = 0
    now = 1_000_000
    for i in range(instances):
        held = nb * (i + 1) // instances
        t0 = _cpu_ns()
        got = lib.omni_index_insert(h, i, phashes, held, now)
        insert_ns += _cpu_ns() - t0
        assert got == held, got
        inserted += held
        left = blocks_per_instance - held
        while left > 0:
            n = min(left, chunk_blocks)
            # fresh random content per chunk (hashing is not timed here)
            buf = ffi.buffer(toks)
            buf[0:4 * n * BLOCK_SIZE] = os.urandom(4 * n * BLOCK_SIZE)
            lib.omni_hash_blocks(toks, n * BLOCK_SIZE, BLOCK_SIZE, 0, chunk, n)
            now += 1000
            t0 = _cpu_ns()
            got = lib.omni_index_insert(h, i, chunk, n, now)
            insert_ns += _cpu_ns() - t0
            assert got == n, got
            inserted += n
            left -= n
        if progress:
            progress(i + 1, instances)
    del tkeep
    stats = ix.stats()
    return ix, (ptoks, phashes, pkeep), nb, {
        "instances": instances,
        "blocks_per_instance": blocks_per_instance,
        "entries": stats["entries"],
        "nodes": stats["nodes"],
        "bytes": stats["bytes"],
        "bytes_per_entry": stats["bytes"] / max(stats["entries"], 1),
        "fill_blocks_per_s": inserted / (insert_ns / 1e9),
    }


def _thrash(junk):
    """Copy a buffer larger than the CPU caches, so the next call finds
    nothing of the index in them.  Both buffers exist beforehand: nothing is
    mapped or unmapped (an unmap would also flush the TLB, a harsher and
    different test)."""
    dst, src = junk
    dst[:] = src


def bench_match(ix, prompt, nb, reps=300, cold_reps=60, thrash_mb=96):
    """Time one full match of the long prompt (hashes precomputed, and
    hashing included), warm and with cold caches (a buffer larger than the
    caches is written before each call).  The long prompt was built by 64
    instances' inserts, so its blocks lie in 64 runs of neighbouring records
    (the worst case measured); `cold_one_run` is a prompt stored by one
    insert.  Returns us figures."""
    ptoks, phashes, _ = prompt
    h = ix._h
    n = ix.num_instances
    out = ffi.new("uint32_t[]", n)
    res = {}

    best = lib.omni_index_match_prefix(h, phashes, nb, 1_000_000, out, n)
    assert best == nb, best
    res["held_blocks"] = sorted(set(out))[-3:]

    def timed(fn, count, cold):
        samples = []
        junk = ((bytearray(thrash_mb << 20), bytes(thrash_mb << 20))
                if cold else None)
        for _ in range(count):
            if cold:
                _thrash(junk)
            t0 = _ns()
            fn()
            samples.append((_ns() - t0) / 1000)
        samples.sort()
        return {"median_us": statistics.median(samples),
                "p99_us": samples[min(len(samples) - 1,
                                      int(len(samples) * 0.99))],
                "min_us": samples[0]}

    def match_hashes():
        lib.omni_index_match_prefix(h, phashes, nb, 1_000_000, out, n)

    res["warm"] = timed(match_hashes, reps, False)
    res["cold"] = timed(match_hashes, cold_reps, True)

    # A prompt stored by one insert (the common case: one request's blocks
    # get neighbouring records), matched with cold caches.
    one_toks, one_keep = _random_tokens(nb * BLOCK_SIZE)
    one = ffi.new("uint64_t[]", nb)
    lib.omni_hash_blocks(one_toks, nb * BLOCK_SIZE, BLOCK_SIZE, 0, one, nb)
    got = lib.omni_index_insert(h, 0, one, nb, 2_000_000)
    assert got == nb, got

    def match_one():
        lib.omni_index_match_prefix(h, one, nb, 2_000_000, out, n)

    res["cold_one_run"] = timed(match_one, cold_reps, True)
    del one_keep

    # The same prompt from its tokens: hashing inside the walk.
    def match_tokens():
        lib.omni_index_match_prefix_tokens(h, ptoks, nb * BLOCK_SIZE,
                                           1_000_000, out, n)

    res["tokens_warm"] = timed(match_tokens, reps, False)
    res["tokens_cold"] = timed(match_tokens, cold_reps, True)
    res["blocks"] = nb
    res["instances"] = n
    return res


def bench_insert_more(ix, prompt, nb, blocks=200_000, chunk_blocks=2048):
    """Insert rates on a full index: new blocks (each evicts one) and
    refreshing blocks already held (the dispatch of a cached prompt)."""
    phashes = prompt[1]
    h = ix._h
    chunk = ffi.new("uint64_t[]", chunk_blocks)
    toks, keep = _random_tokens(chunk_blocks * BLOCK_SIZE)
    before = ix.stats()
    ns = 0
    done = 0
    now = 10_000_000_000
    inst = 0
    while done < blocks:
        n = min(chunk_blocks, blocks - done)
        ffi.buffer(toks)[0:4 * n * BLOCK_SIZE] = os.urandom(4 * n * BLOCK_SIZE)
        lib.omni_hash_blocks(toks, n * BLOCK_SIZE, BLOCK_SIZE, 0, chunk, n)
        now += 1000
        t0 = _cpu_ns()
        got = lib.omni_index_insert(h, inst, chunk, n, now)
        ns += _cpu_ns() - t0
        assert got == n
        done += n
        inst = (inst + 1) % ix.num_instances
    after = ix.stats()
    evicted = after["evicted_instance"] - before["evicted_instance"]

    # refresh: the long prompt again on the instance that holds all of it
    last = ix.num_instances - 1
    t_ref = []
    for _ in range(50):
        now += 1000
        t0 = _cpu_ns()
        got = lib.omni_index_insert(h, last, phashes, nb, now)
        t_ref.append(_cpu_ns() - t0)
        assert got == nb
    del keep
    return {
        "evicting_blocks_per_s": done / (ns / 1e9),
        "evicted": evicted,
        "refresh_blocks_per_s": nb / (statistics.median(t_ref) / 1e9),
    }


def bench_decision(instances=32, prompt_tokens=4096, reps=20000):
    """Cost of one prefill decision over `instances` candidates.

    policy_only: omni_policy_prefill_choose; prepare_choose: + filling wait
    and prefill predictions from the predictor; full: + hashing the prompt
    and matching it in an index of those instances.  Per call, in us, with
    the Python call overhead (one empty library call) reported beside.
    """
    pred = Predictor(instances)
    ix = PrefixIndex(instances, BLOCK_SIZE, 10_000)
    toks, keep = _random_tokens(prompt_tokens)
    nb = prompt_tokens // BLOCK_SIZE
    hashes = ffi.new("uint64_t[]", nb)
    lib.omni_hash_blocks(toks, prompt_tokens, BLOCK_SIZE, 0, hashes, nb)
    for i in range(instances):
        lib.omni_index_insert(ix._h, i, hashes, nb * i // instances, 0)
        for k in range(4):
            pred.observe_prefill(i, 1000 + 300 * k, 100 * k, 20000 + 900 * k)
        pred.dispatch_prefill(i, 500 * (i % 5), 0, 0)

    cands = ffi.new("omni_prefill_cand_t[]", instances)
    for i in range(instances):
        cands[i].inst = i
        cands[i].running = i % 3
        cands[i].max_running = 8
        cands[i].max_tokens = 16384
        cands[i].inflight_tokens = 500 * (i % 5)
    matched = ffi.new("uint32_t[]", instances)
    dec = ffi.new("omni_decision_t *")
    p = pred._h
    h = ix._h
    choose = lib.omni_policy_prefill_choose
    prepare = lib.omni_policy_prefill_prepare
    match = lib.omni_index_match_prefix_tokens
    slack = 2000

    def per_call(fn, n):
        best = None
        for _ in range(3):
            t0 = _cpu_ns()
            for _ in range(n):
                fn()
            dt = (_cpu_ns() - t0) / n / 1000
            best = dt if best is None else min(best, dt)
        return best

    def only():
        choose(cands, instances, prompt_tokens, slack, dec)

    def prep():
        prepare(p, matched, instances, BLOCK_SIZE, prompt_tokens, 1000, cands,
                instances)
        choose(cands, instances, prompt_tokens, slack, dec)

    def full():
        match(h, toks, prompt_tokens, 1000, matched, instances)
        prepare(p, matched, instances, BLOCK_SIZE, prompt_tokens, 1000, cands,
                instances)
        choose(cands, instances, prompt_tokens, slack, dec)

    res = {
        "instances": instances,
        "prompt_tokens": prompt_tokens,
        "call_overhead_us": _call_overhead_ns() / 1000,
        "policy_only_us": per_call(only, reps),
        "prepare_choose_us": per_call(prep, reps // 2),
        "full_us": per_call(full, reps // 10),
    }
    del keep
    return res


def run_bench(quick=False, json_seconds=1.0, progress=None, hugepages=False):
    """Every figure as one dict.  quick: small sizes (tests, smoke runs);
    hugepages: the index in memory advised for transparent huge pages."""
    if quick:
        inst, per, ptoks = 8, 5_000, 4096
    else:
        inst, per, ptoks = 64, 100_000, 32768
    res = {"machine": {"cpus": os.cpu_count(),
                       "loadavg_start": os.getloadavg()}}
    res["hash"] = bench_hash(tokens=1 << (16 if quick else 20),
                             reps=5 if quick else 20)
    ix, prompt, nb, fill = build_index(inst, per, ptoks, progress=progress,
                                       hugepages=hugepages)
    fill["hugepages"] = hugepages
    res["index"] = fill
    res["match"] = bench_match(ix, prompt, nb, reps=50 if quick else 300,
                               cold_reps=5 if quick else 60,
                               thrash_mb=8 if quick else 96)
    res["insert"] = bench_insert_more(ix, prompt, nb,
                                      blocks=20_000 if quick else 200_000)
    if quick:
        ix.check_integrity()
    del ix
    res["decision"] = bench_decision(reps=2000 if quick else 20000)
    res["json"] = _bench_json(json_seconds if not quick else 0.05)
    res["machine"]["loadavg_end"] = os.getloadavg()
    return res


def _bench_json(seconds):
    try:
        from .lib_json import bench_json
    except ImportError as exc:
        return {"error": f"not available: {exc}"}
    return bench_json(seconds)


def format_bench(res):
    """Human-readable lines for run_bench()'s result."""
    lines = []
    mach = res.get("machine", {})
    if "loadavg_start" in mach:
        lines.append(f"machine   {mach['cpus']} cpus, load average "
                     f"{mach['loadavg_start'][0]:.2f} at start, "
                     f"{mach.get('loadavg_end', (0,))[0]:.2f} at end "
                     f"(rates in CPU time, match in wall time)")
    hs = res["hash"]
    lines.append(f"hash      {hs['tokens_per_s'] / 1e9:8.2f} G tokens/s "
                 f"(block {hs['block_size']}, {hs['tokens']} tokens)")
    ix = res["index"]
    lines.append(f"index     {ix['instances']} instances x "
                 f"{ix['blocks_per_instance']} blocks"
                 f"{' (huge pages advised)' if ix.get('hugepages') else ''}: "
                 f"{ix['entries']} entries, "
                 f"{ix['nodes']} nodes, {ix['bytes'] / 2**20:.0f} MiB, "
                 f"{ix['bytes_per_entry']:.1f} bytes/entry (target <= 64)")
    ins = res["insert"]
    lines.append(f"insert    fill {ix['fill_blocks_per_s'] / 1e6:6.2f} M "
                 f"blocks/s, at capacity "
                 f"{ins['evicting_blocks_per_s'] / 1e6:6.2f} M blocks/s "
                 f"(each evicts one), refresh "
                 f"{ins['refresh_blocks_per_s'] / 1e6:6.2f} M blocks/s "
                 f"(target >= 2 M)")
    m = res["match"]
    lines.append(f"match     {m['blocks']} blocks x {m['instances']} "
                 f"instances: "
                 f"warm median {m['warm']['median_us']:.1f} us "
                 f"p99 {m['warm']['p99_us']:.1f} us; cold caches median "
                 f"{m['cold']['median_us']:.1f} us "
                 f"p99 {m['cold']['p99_us']:.1f} us "
                 f"(target <= 100 us)")
    lines.append(f"match     cold caches, prompt stored by one insert: median "
                 f"{m['cold_one_run']['median_us']:.1f} us p99 "
                 f"{m['cold_one_run']['p99_us']:.1f} us")
    lines.append(f"match     from tokens (hashing included): warm median "
                 f"{m['tokens_warm']['median_us']:.1f} us, cold median "
                 f"{m['tokens_cold']['median_us']:.1f} us")
    d = res["decision"]
    lines.append(f"decision  {d['instances']} instances: policy "
                 f"{d['policy_only_us']:.2f} us, +predictions "
                 f"{d['prepare_choose_us']:.2f} us, +hash/match of "
                 f"{d['prompt_tokens']} tokens {d['full_us']:.2f} us "
                 f"(Python call overhead {d['call_overhead_us']:.2f} us per "
                 f"call included; target << 50 us)")
    js = res.get("json")
    if isinstance(js, dict) and "error" in js:
        lines.append(f"json      {js['error']}")
    elif js:
        try:
            from .lib_json import format_json_bench
            lines.extend(format_json_bench(js))
        except ImportError:
            lines.append("json      " + json.dumps(js))
    return lines


@click.command("bench-lib")
@click.option("--quick", is_flag=True,
              help="Small sizes (seconds, for smoke tests), not the targets'.")
@click.option("--json-seconds", type=float, default=1.0, show_default=True,
              help="Seconds per JSON body and step.")
@click.option("--hugepages", is_flag=True,
              help="Build the index in private memory advised for "
                   "transparent huge pages.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True),
              help="Also write every figure as JSON to this file.")
def bench_lib(quick, json_seconds, hugepages, out):
    """Benchmark the scoring library (hashing, index, policies, JSON)."""
    def progress(done, total):
        click.echo(f"filling index: {done}/{total} instances", err=True)

    res = run_bench(quick=quick, json_seconds=json_seconds, progress=progress,
                    hugepages=hugepages)
    for line in format_bench(res):
        click.echo(line)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2, default=str)
            f.write("\n")
