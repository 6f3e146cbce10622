"""Ingestion of the agent's batches (omni_ingest.c) into a real prefix index,
through cffi: the block-size mapping, removals, clears, states, metrics,
rejections; and fuzzing (random and mutated batches) under the debug build's
ASan/UBSan.
"""

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_ctl.agent.batch import Batch, BatchError, split_batches
from omni_ctl.scoring import IngestTarget, Predictor, PrefixIndex, block_hashes, lib
from omni_ctl.scoring.errors import InvalidArgumentError

A, B = "127.0.0.1:8001", "127.0.0.1:8002"


def target(block_size, n=2, cap=1000):
    ix = PrefixIndex(n, block_size, cap)
    return IngestTarget(ix, {A: 0, B: 1})


def engine_chain(tokens, e, salt=7):
    """Engine-like chained hashes (any function will do: they are opaque)."""
    out, parent = [], salt
    for i in range(len(tokens) // e):
        parent = hash((parent, tuple(tokens[i * e:(i + 1) * e]))) & (2**64 - 1)
        out.append(parent)
    return out


def test_same_block_size_store_remove_clear():
    t = target(16)
    toks = list(range(1000, 1000 + 48))
    h = engine_chain(toks, 16)
    b = Batch(16)
    b.state(A, "precise", "up")
    b.store(A, 16, h[:2], toks[:32])
    b.store(A, 16, h[2:], toks[32:], anchor=h[1])
    assert t.apply(b.encode(), now_us=1000) == 3
    assert t.index.match(toks, now_us=1000) == [3, 0]
    # the same blocks as PrefixIndex.apply_stored keys them: token ids
    ref = PrefixIndex(2, 16, 1000)
    ref.apply_stored(1, h, None, toks, now_us=0)
    assert ref.match(toks, now_us=0) == [0, 3]

    b = Batch(16)
    b.remove(A, 16, [h[2]])
    t.apply(b.encode(), now_us=2000)
    assert t.index.match(toks, now_us=2000) == [2, 0]
    b = Batch(16)
    b.clear(A)
    t.apply(b.encode(), now_us=3000)
    assert t.index.match(toks, now_us=3000) == [0, 0]
    st_ = t.instance(0)
    assert st_["mode"] == "precise" and st_["health"] == "up"
    assert (st_["stores"], st_["removals"], st_["clears"]) == (2, 1, 1)
    assert st_["blocks_stored"] == 3 and st_["blocks_removed"] == 1
    t.index.check_integrity()


def test_engine_blocks_smaller_than_index_blocks_with_lead():
    """E=16, B=64: a store cut inside an index block carries its lead."""
    t = target(64)
    toks = list(range(5000, 5000 + 128))
    h = engine_chain(toks, 16)                # 8 engine blocks
    b = Batch(64)
    b.store(A, 16, h[:5], toks[:80])          # 1 index block, 16 left over
    assert t.apply(b.encode(), now_us=1) == 1
    assert t.index.match(toks, now_us=1) == [1, 0]
    assert t.instance(0)["blocks_stored"] == 1
    # blocks 5..7 follow block 4: lead = block 4's tokens, anchor = block 3
    b = Batch(64)
    b.store(A, 16, h[5:], toks[80:], anchor=h[3], lead=toks[64:80])
    t.apply(b.encode(), now_us=2)
    assert t.index.match(toks, now_us=2) == [2, 0]
    # the last engine block of index block 1 names it
    b = Batch(64)
    b.remove(A, 16, [h[7]])
    t.apply(b.encode(), now_us=3)
    assert t.index.match(toks, now_us=3) == [1, 0]
    t.index.check_integrity()


def test_engine_blocks_larger_than_index_blocks():
    """E=32, B=16: each engine block ends two index blocks."""
    t = target(16)
    toks = list(range(64))
    h = engine_chain(toks, 32)
    b = Batch(16)
    b.store(B, 32, h[:1], toks[:32])
    b.store(B, 32, h[1:], toks[32:], anchor=h[0])
    t.apply(b.encode(), now_us=1)
    assert t.index.match(toks, now_us=1) == [0, 4]
    b = Batch(16)
    b.remove(B, 32, [h[1]])
    t.apply(b.encode(), now_us=2)
    assert t.index.match(toks, now_us=2) == [0, 2]
    assert t.instance(1)["blocks_removed"] == 2
    t.index.check_integrity()


def test_a_prompts_last_block_stored_tells_the_predictor_its_end():
    """The index's hash of the last block an engine stores for a prompt is
    the one the proxy computes from its token ids (block_hashes), whatever
    the engine's own hashes and block size, and in however many stores the
    chunks of its prefill come: the store of that block tells the predictor
    that the prefill is over (omni_ingest_apply_to), the others nothing."""
    for e, chunks in ((16, (0, 64, 160)), (32, (0, 96, 160)), (8, (0, 48, 160))):
        p = Predictor(2, min_us=100, transfer=True)
        t = IngestTarget(PrefixIndex(2, 16, 1000), {A: 0, B: 1}, predictor=p)
        toks = list(range(7000, 7000 + 170))        # 10 full blocks of 16
        end = block_hashes(toks, 16)[-1]
        job = p.dispatch_prefill(1, len(toks), 0, 49_000)
        p.expect_prefill_end(1, job, end)
        after = p.dispatch_prefill(1, 1000, 0, 49_500)
        predicted = p.end_us(1)
        h = engine_chain(toks, e)
        for i, (a, z) in enumerate(zip(chunks, chunks[1:])):
            b = Batch(16)
            b.store(B, e, h[a // e:z // e], toks[a:z],
                    anchor=h[a // e - 1] if a else None)
            t.apply(b.encode(), now_us=50_000 + i)
            if z < chunks[-1]:              # chunks before the last: no end
                assert t.stats()["engine_ends"] == 0 and p.end_us(1) == predicted
        assert t.index.match(toks, now_us=60_000) == [0, 10]
        assert t.stats()["engine_ends"] == 1
        assert p.end_us(1) == 50_001 + after.service_us
        assert p.state(1)["engine_ends"] == 1 and p.state(0)["engine_ends"] == 0
        # the same blocks stored on another instance: no end
        b = Batch(16)
        b.store(A, e, h[:160 // e], toks[:160])
        t.apply(b.encode(), now_us=70_000)
        assert t.stats()["engine_ends"] == 1


def test_orphan_store_and_unknown_names_are_counted_not_fatal():
    t = target(16)
    toks = list(range(32))
    b = Batch(16)
    b.store(A, 16, [11, 12], toks, anchor=999)      # anchor never stored
    b.store("127.0.0.1:9999", 16, [1, 2], toks)
    assert t.apply(b.encode(), now_us=1) == 1
    assert t.instance(0)["orphans"] == 1
    assert t.stats()["unknown_names"] == 1
    assert t.index.match(toks, now_us=1) == [0, 0]


def test_state_metrics_capacity_and_ttl():
    t = target(16, cap=1000)
    b = Batch(16)
    b.state(A, "precise", "up")
    b.metrics(A, running=3, waiting=5, kv_usage=0.25,
              capacity_tokens=16 * 200)
    t.apply(b.encode(), now_us=10_000)
    s = t.instance(0)
    assert (s["running"], s["waiting"], s["kv_usage_ppm"]) == (3, 5, 250000)
    assert s["capacity_tokens"] == 3200
    # precise: the engine's 200 blocks, and as much room again for the marks
    # of prompts sent and not yet stored
    assert lib.OMNI_INGEST_PRECISE_ROOM > 1
    assert (t.index.instance_stats(0)["capacity"]
            == 200 * lib.OMNI_INGEST_PRECISE_ROOM)
    # a silent agent: precise turns approximate after the TTL, not before,
    # and the index guesses evictions at the engine's capacity again
    assert t.expire(ttl_us=5_000, now_us=14_000) == 0
    assert t.expire(ttl_us=5_000, now_us=20_000) == 1
    s = t.instance(0)
    assert s["mode"] == "approx" and s["resyncs"] == 1
    assert t.index.instance_stats(0)["capacity"] == 200
    # precise again (a consistent stream): the room comes back
    b = Batch(16)
    b.state(A, "precise", "up")
    t.apply(b.encode(), now_us=21_000)
    assert (t.index.instance_stats(0)["capacity"]
            == 200 * lib.OMNI_INGEST_PRECISE_ROOM)
    # an instance whose stream is approximate from the start: the engine's
    b = Batch(16)
    b.state(B, "approx", "up")
    b.metrics(B, capacity_tokens=16 * 50)
    t.apply(b.encode(), now_us=21_000)
    assert t.index.instance_stats(1)["capacity"] == 50
    b = Batch(16)
    b.state(A, "approx", "down")
    t.apply(b.encode(), now_us=30_000)
    assert t.instance(0)["health"] == "down"


def test_marking_a_prompt_on_a_full_precise_instance_keeps_the_engines_blocks():
    """The proxy marks a prompt's blocks on the instance it sends it to
    before the engine stores them.  On a precise instance whose cache is
    full, those marks must not push out blocks the engine still holds: the
    engine evicts its own victims and says so (issue 22's Mooncake runs: the
    index evicted ~2,000 blocks per instance that way and lost hits)."""
    t = target(16, cap=1000)
    held = list(range(5000, 5000 + 16 * 10))           # fills the engine
    h = engine_chain(held, 16)
    b = Batch(16)
    b.state(A, "precise", "up")
    b.metrics(A, capacity_tokens=16 * 10)
    b.store(A, 16, h, held)
    t.apply(b.encode(), now_us=1000)
    assert t.index.match(held, now_us=1000) == [10, 0]
    # a new prompt sent there: marked, not yet stored by the engine
    sent = list(range(9000, 9000 + 16 * 4))
    assert t.index.insert(0, sent, now_us=2000) == 4
    # every block the engine holds is still predicted
    assert t.index.match(held, now_us=2000) == [10, 0]
    assert t.index.match(sent, now_us=2000) == [4, 0]
    # the engine makes room its own way (here: the held prompt's last four
    # blocks) and stores the new one: the index is the engine's cache again
    hs = engine_chain(sent, 16)
    b = Batch(16)
    b.remove(A, 16, h[6:])
    b.store(A, 16, hs, sent)
    t.apply(b.encode(), now_us=3000)
    assert t.index.match(held, now_us=3000) == [6, 0]
    assert t.index.match(sent, now_us=3000) == [4, 0]
    st_ = t.index.instance_stats(0)
    assert st_["precise"] == 10 and st_["evicted"] == 0, st_


def test_scheduling_discounts_approximate_and_blends_engine_load():
    t = target(16)
    # unknown (no agent) and precise instances keep their match
    assert t.discount([8, 8]) == [8, 8]
    b = Batch(16)
    b.state(A, "precise", "up")
    b.state(B, "approx", "up")
    b.metrics(A, running=3, waiting=4)
    t.apply(b.encode(), now_us=10_000)
    assert t.discount([8, 8]) == [8, 8 // lib.OMNI_INGEST_APPROX_DIV]
    assert t.discount([0, 1]) == [0, 1 // lib.OMNI_INGEST_APPROX_DIV]
    # the engine's running + waiting when more than the proxy's own legs
    assert t.blend_running(0, 2, ttl_us=5_000, now_us=11_000) == 7
    assert t.blend_running(0, 9, ttl_us=5_000, now_us=11_000) == 9
    # with our own figure at the scrape noted (3 of the 7 were ours), the
    # engine's report adds only the other 4, from its second report saying
    # so on: once our 3 finished (0 now), no phantom load stays until the
    # next scrape
    assert t.note_ours([3, 0]) == 1
    assert t.blend_running(0, 0, ttl_us=5_000, now_us=11_000) == 0
    assert t.note_ours([9, 9]) == 0         # noted once per report
    b = Batch(16)
    b.metrics(A, running=3, waiting=4)
    t.apply(b.encode(), now_us=10_200)
    assert t.note_ours([3, 0]) == 1
    assert t.blend_running(0, 0, ttl_us=5_000, now_us=11_000) == 4
    assert t.blend_running(0, 5, ttl_us=5_000, now_us=11_000) == 9
    # we had more than the engine counted (arrivals since): ours only
    b = Batch(16)
    b.metrics(A, running=1, waiting=0)
    t.apply(b.encode(), now_us=10_500)
    assert t.note_ours([6, 0]) == 1
    assert t.blend_running(0, 6, ttl_us=5_000, now_us=11_000) == 6
    # a leg of ours that ended between the scrape and the report (the engine
    # counted 2, we have 1 left): that one report's "beyond" is no load
    b = Batch(16)
    b.metrics(A, running=2, waiting=0)
    t.apply(b.encode(), now_us=10_600)
    assert t.note_ours([1, 0]) == 1
    assert t.blend_running(0, 1, ttl_us=5_000, now_us=11_000) == 1
    # 2 beyond ours in two reports in a row is work others sent
    for now in (10_700, 10_800):
        b = Batch(16)
        b.metrics(A, running=3, waiting=0)
        t.apply(b.encode(), now_us=now)
        assert t.note_ours([1, 0]) == 1
    assert t.blend_running(0, 1, ttl_us=5_000, now_us=11_000) == 3
    # a report older than the TTL counts no more
    assert t.blend_running(0, 2, ttl_us=5_000, now_us=20_000) == 2
    # an instance the agent never reported: the proxy's figure
    t2 = target(16)
    assert t2.blend_running(1, 4, ttl_us=5_000, now_us=11_000) == 4
    # a silent agent: precise turns approximate and is discounted
    t.expire(ttl_us=5_000, now_us=20_000)
    assert t.discount([8, 8])[0] == 8 // lib.OMNI_INGEST_APPROX_DIV


def test_bad_batches_are_rejected_counted_and_change_nothing():
    t = target(16)
    toks = list(range(32))
    b = Batch(16)
    b.store(A, 16, [1, 2], toks)
    good = b.encode()
    cases = {
        "bad magic": b"XXXX" + good[4:],
        "unsupported version": good[:4] + struct.pack("<H", 9) + good[6:],
        "batch shorter": good[:-1],
        "bad total": good + b"\0",
        "block sizes": good[:12] + struct.pack("<I", 32) + good[16:],
        "short": good[:10],
    }
    for why, data in cases.items():
        with pytest.raises(InvalidArgumentError):
            t.apply(data, now_us=1)
    st_ = t.stats()
    assert st_["rejected"] == len(cases) and st_["batches"] == 0
    assert t.index.stats()["entries"] == 0
    # engine block size 24 does not divide 16 (nor 16 it)
    b = Batch(16)
    b.store(A, 24, [1], list(range(24)))
    with pytest.raises(InvalidArgumentError, match="block sizes"):
        t.apply(b.encode(), now_us=1)
    # a lead must be whole engine blocks below the index block size
    t64 = target(64)
    b = Batch(64)
    b.store(A, 16, [1], list(range(16)), anchor=5, lead=list(range(8)))
    with pytest.raises(InvalidArgumentError, match="lead"):
        t64.apply(b.encode(), now_us=1)
    t.apply(good, now_us=2)
    assert t.index.match(toks, now_us=2) == [2, 0]


def test_encoder_errors_and_dump_split():
    b = Batch(0)
    with pytest.raises(BatchError):
        b.store(A, 16, [1], list(range(15)))
    with pytest.raises(BatchError):
        b.store(A, 16, [1], list(range(16)), anchor=1, lead=list(range(16)))
    b.clear(A)
    c = Batch(16)
    c.clear(B)
    assert split_batches(b.encode() + c.encode()) == [b.encode(), c.encode()]
    with pytest.raises(BatchError):
        split_batches(b.encode()[:-1])


# ---- fuzzing ------------------------------------------------------------------

def sample_batches(rng):
    out = []
    for bs in (16, 64):
        b = Batch(bs)
        toks = [rng.randrange(50000) for _ in range(128)]
        h = engine_chain(toks, 16)
        b.state(A, "precise", "up")
        b.store(A, 16, h[:5], toks[:80])
        b.store(A, 16, h[5:], toks[80:], anchor=h[3] if bs == 64 else h[4],
                lead=toks[64:80] if bs == 64 else ())
        b.remove(B, 16, h[:3])
        b.metrics(B, running=1, waiting=2, kv_usage=0.5, capacity_tokens=640)
        b.clear(B)
        out.append((bs, b.encode()))
    return out


SEEDS = sample_batches(random.Random(1))
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def apply_any(bs, data):
    t = target(bs)
    before = t.stats()["rejected"]
    try:
        t.apply(data, now_us=1)
        assert t.stats()["batches"] == 1
    except InvalidArgumentError:
        assert t.stats()["rejected"] == before + 1
        assert t.index.stats()["entries"] == 0      # nothing applied
    t.index.check_integrity()


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([16, 64]))
def test_fuzz_random_bytes(data, bs):
    apply_any(bs, data)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([16, 64]))
def test_fuzz_random_body_behind_a_valid_header(body, bs):
    n_names = 1 + len(body) % 3
    head = struct.pack("<IHHIIHHI", lib.OMNI_INGEST_MAGIC, 1, 24,
                       24 + len(body), bs, n_names, 0, len(body) % 5)
    apply_any(bs, head + body)


@FUZZ
@given(st.integers(0, 1), st.lists(st.tuples(
    st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(-8, 8))
def test_fuzz_mutated_valid_batches(which, flips, cut):
    bs, data = SEEDS[which]
    buf = bytearray(data)
    for pos, val in flips:
        buf[pos % len(buf)] = val
    if cut < 0:
        buf = buf[:cut]
    elif cut > 0:
        buf += bytes(cut)
    apply_any(bs, bytes(buf))


def test_fuzz_seeds_are_valid():
    """The mutation seeds themselves apply (else the fuzzing above would only
    ever see rejections)."""
    for bs, data in SEEDS:
        t = target(bs)
        assert t.apply(data, now_us=1) == 6
        assert t.instance(0)["blocks_stored"] == 128 // bs
