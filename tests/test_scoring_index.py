"""The prefix index (omni_index.h): every operation through the Python layer.

Rules are checked against hand-worked expectations here; the random-sequence
comparison with a pure-Python model is in test_scoring_index_model.py.
"""

import pytest

from omni_ctl.scoring import PrefixIndex, block_hashes, ffi, lib
from omni_ctl.scoring.errors import (IntegrityError, InvalidArgumentError,
                                     NotFoundError)

BS = 4


def prompt(*blocks):
    """Tokens of whole blocks, each block given by one distinct number."""
    out = []
    for b in blocks:
        out += [b, b + 1000, b + 2000, b + 3000]
    return out


def idx(n=4, cap=100, **kw):
    return PrefixIndex(n, BS, cap, **kw)


def test_insert_and_match_per_instance():
    ix = idx()
    p = prompt(1, 2, 3, 4)
    assert ix.insert(0, p, now_us=0) == 4
    assert ix.insert(2, p[:8], now_us=0) == 2
    assert ix.match(p, now_us=0) == [4, 0, 2, 0]
    # a diverging request: shares block 1 only
    assert ix.match(prompt(1, 9, 3, 4), now_us=0) == [1, 0, 1, 0]
    assert ix.match(prompt(9), now_us=0) == [0, 0, 0, 0]
    assert ix.match(p + [1, 2], now_us=0) == [4, 0, 2, 0]    # partial block
    assert ix.match([], now_us=0) == [0, 0, 0, 0]
    ix.check_integrity()
    s = ix.stats()
    assert (s["entries"], s["nodes"], s["approx"], s["precise"]) == (6, 4, 6, 0)


def test_match_hashes_equals_match_tokens_across_chunks():
    # longer than the 256-block chunks the token walk hashes at a time
    ix = PrefixIndex(3, 2, 2000)
    p = list(range(1200))
    ix.insert(0, p, now_us=0)
    ix.insert(1, p[:700], now_us=0)
    h = block_hashes(p, 2)
    assert ix.match(p, now_us=0) == ix.match_hashes(h, now_us=0) == [600, 350, 0]


def test_many_instances_bitmap_words():
    ix = PrefixIndex(300, BS, 10)
    p = prompt(1, 2, 3)
    for i, held in ((0, 1), (63, 2), (64, 3), (127, 1), (128, 2), (299, 3)):
        ix.insert(i, p[:held * BS], now_us=0)
    got = ix.match(p, now_us=0)
    want = [0] * 300
    want[0], want[63], want[64], want[127], want[128], want[299] = 1, 2, 3, 1, 2, 3
    assert got == want
    ix.check_integrity()


def test_store_extends_parent_chain():
    """The earlier Omni Proxy put every stored chain at the root, so a store
    continuing a cached prefix never matched; here it extends the chain."""
    ix = idx()
    p = prompt(1, 2, 3)
    assert ix.apply_stored(1, [101, 102], None, p[:8], now_us=0) == 2
    assert ix.apply_stored(1, [103], 102, p[8:], now_us=0) == 1
    assert ix.match(p, now_us=0) == [0, 3, 0, 0]
    h = block_hashes(p, BS)
    assert ix.lru(1, "precise") == [h[2], h[0], h[1]]   # the newer store first
    ix.check_integrity()


def test_store_with_unknown_parent_stores_nothing():
    ix = idx()
    p = prompt(1, 2)
    ix.apply_stored(0, [101], None, p[:4], now_us=0)
    with pytest.raises(NotFoundError):
        ix.apply_stored(1, [102], 101, p[4:], now_us=0)   # parent on 0, not 1
    with pytest.raises(LookupError):                       # the builtin
        ix.apply_stored(0, [102], 555, p[4:], now_us=0)
    assert ix.stats()["orphan_stores"] == 2
    assert ix.match(p, now_us=0) == [1, 0, 0, 0]
    ix.check_integrity()


def test_store_validates_token_count():
    ix = idx()
    with pytest.raises(InvalidArgumentError):
        ix.apply_stored(0, [1, 2], None, prompt(1), now_us=0)
    with pytest.raises(ValueError):
        ix.apply_stored(9, [1], None, prompt(1), now_us=0)   # no instance 9


def test_engine_hashes_wide_signed_and_bytes():
    ix = idx()
    p = prompt(1, 2, 3)
    big = 2**64 - 5
    ix.apply_stored(0, [big, b"\x07" * 32], None, p[:8], now_us=0)
    ix.apply_stored(0, [-3], b"\x07" * 32, p[8:], now_us=0)
    assert ix.match(p, now_us=0)[0] == 3
    assert ix.apply_removed(0, [big - 2**64]) == 1           # same as big
    assert ix.match(p, now_us=0)[0] == 0
    ix.check_integrity()


def test_removed_and_unknown_removals():
    ix = idx()
    p = prompt(1, 2, 3)
    ix.apply_stored(0, [11, 12, 13], None, p, now_us=0)
    assert ix.apply_removed(0, [12, 99]) == 1                # 99 unknown
    assert ix.stats()["unknown_removals"] == 1
    assert ix.match(p, now_us=0)[0] == 1                    # cut at block 2
    assert ix.apply_removed(0, [12]) == 0                    # at least once
    ix.check_integrity()


def test_cleared_drops_both_kinds():
    ix = idx()
    ix.apply_stored(0, [11], None, prompt(1), now_us=0)
    ix.insert(0, prompt(5, 6), now_us=0)
    ix.insert(1, prompt(5, 6), now_us=0)
    assert ix.apply_cleared(0) == 3
    assert ix.instance_stats(0)["blocks"] == 0
    assert ix.match(prompt(5, 6), now_us=0) == [0, 2, 0, 0]
    ix.check_integrity()


def test_precise_store_upgrades_approximate_and_insert_never_downgrades():
    ix = idx()
    p = prompt(1, 2)
    ix.insert(0, p, now_us=0)
    assert ix.instance_stats(0)["approx"] == 2
    ix.apply_stored(0, [21, 22], None, p, now_us=0)
    assert (ix.instance_stats(0)["precise"], ix.instance_stats(0)["approx"]) == (2, 0)
    ix.insert(0, p + prompt(3), now_us=0)
    s = ix.instance_stats(0)
    assert (s["precise"], s["approx"]) == (2, 1)
    ix.check_integrity()


def test_withdraw_drops_only_our_marks():
    """A prompt the engine refused: its approximate marks go, the engine's
    own (precise) blocks and other instances' entries stay."""
    ix = idx()
    shared, own = prompt(1, 2), prompt(3, 4)
    ix.apply_stored(0, [21, 22], None, shared, now_us=0)
    ix.insert(0, shared + own, now_us=0)
    ix.insert(1, shared + own, now_us=0)
    assert ix.withdraw(0, shared + own) == 2
    assert ix.match(shared + own, now_us=0)[:2] == [2, 4]
    s = ix.instance_stats(0)
    assert (s["precise"], s["approx"]) == (2, 0)
    assert ix.stats()["removed"] == 2
    assert ix.withdraw(0, shared + own) == 0       # nothing left to drop
    assert ix.withdraw_hashes(2, [0, 12345]) == 0
    with pytest.raises(InvalidArgumentError):
        ix.withdraw_hashes(9, [1])
    ix.check_integrity()


def test_withdrawn_marks_leave_the_engine_capacity_to_the_engine():
    """With KV events an instance's capacity is the engine's own cache: the
    marks of a refused prompt must not push out blocks the engine still
    holds (issue 22's Mooncake run: a 134k-token prompt the engine refused
    with 400 pushed out a 37k-token prefix it later served from cache)."""
    held = prompt(1, 2, 3)
    for withdraw in (False, True):
        ix = idx(cap=8)                               # the engine's: 8 blocks
        ix.apply_stored(0, [11, 12, 13], None, held, now_us=0)
        refused = prompt(50, 51, 52, 53, 54)
        ix.insert(0, refused, now_us=10**6)          # the dispatch's marks
        if withdraw:
            ix.withdraw(0, refused)                   # the engine said 400
        ix.insert(0, prompt(60, 61), now_us=2 * 10**6)   # the next dispatch
        ix.apply_stored(0, [31, 32], None, prompt(60, 61), now_us=2 * 10**6)
        assert ix.match(held, now_us=0)[0] == (3 if withdraw else 1)
        ix.check_integrity()


def test_remapped_engine_hash():
    ix = idx()
    ix.apply_stored(0, [7], None, prompt(1), now_us=0)
    ix.apply_stored(0, [7], None, prompt(2), now_us=0)   # 7 now names block 2
    assert ix.match(prompt(1), now_us=0)[0] == 0
    assert ix.match(prompt(2), now_us=0)[0] == 1
    assert ix.stats()["remapped"] == 1
    ix.check_integrity()


def test_instance_capacity_evicts_lru_deepest_first():
    ix = idx(cap=4)
    a, b = prompt(1, 2, 3), prompt(5, 6)
    ix.insert(0, a, now_us=0)
    ix.insert(0, b, now_us=1000)          # evicts a's deepest block
    assert ix.match(a, now_us=0)[0] == 2
    assert ix.match(b, now_us=0)[0] == 2
    ix.insert(0, a[:4], now_us=2000)      # touch a's first block only
    ix.insert(0, prompt(9), now_us=3000)  # the tail is a2 (used at t=0)
    assert ix.match(a, now_us=0)[0] == 1
    assert ix.match(b, now_us=0)[0] == 2
    ix.insert(0, prompt(10), now_us=4000)  # then b's deepest block
    assert ix.match(b, now_us=0)[0] == 1
    assert ix.match(a, now_us=0)[0] == 1
    assert ix.instance_stats(0)["evicted"] == 3
    ix.check_integrity()


def test_insert_longer_than_capacity_stops_instead_of_eating_itself():
    ix = idx(cap=3)
    p = prompt(1, 2, 3, 4, 5)
    assert ix.insert(0, p, now_us=0) == 3          # never a silent failure
    assert ix.match(p, now_us=0)[0] == 3
    assert ix.stats()["truncated"] == 1
    ix.check_integrity()


def test_global_capacity_evicts_globally_oldest():
    ix = idx(n=3, cap=10, global_capacity=4)
    ix.insert(0, prompt(1, 2), now_us=0)
    ix.insert(1, prompt(3, 4), now_us=5000)
    ix.insert(2, prompt(5, 6), now_us=9000)        # instance 0 is oldest
    assert ix.match(prompt(1, 2), now_us=0)[0] == 0
    assert ix.match(prompt(5, 6), now_us=0)[2] == 2
    assert ix.stats()["evicted_global"] == 2
    ix.check_integrity()


def test_node_capacity():
    ix = idx(n=2, cap=10, max_nodes=3)
    ix.insert(0, prompt(1, 2), now_us=0)
    ix.insert(1, prompt(1, 2), now_us=0)           # shares nodes: no eviction
    assert ix.stats()["nodes"] == 2
    ix.insert(1, prompt(7, 8), now_us=5000)        # needs 2 nodes, 1 free
    assert ix.stats()["nodes"] <= 3
    assert ix.match(prompt(7, 8), now_us=0)[1] == 2
    ix.check_integrity()


def test_ttl_expires_approximate_only_and_touch_refreshes():
    ix = idx(approx_ttl_us=10_000)
    a, b = prompt(1, 2), prompt(3)
    ix.insert(0, a, now_us=0)
    ix.apply_stored(1, [5, 6], None, a, now_us=0)
    ix.insert(2, b, now_us=0)
    ix.insert(2, b, now_us=8_000)                  # refreshed
    assert ix.match(a, now_us=9_000)[:2] == [2, 2]
    assert ix.match(a, now_us=11_000)[:2] == [0, 2]   # precise never expires
    assert ix.match(b, now_us=17_000)[2] == 1
    assert ix.match(b, now_us=19_000)[2] == 0
    assert ix.stats()["expired"] == 3
    ix.check_integrity()


def test_explicit_evict_and_set_capacity_and_remove():
    ix = idx()
    ix.insert(0, prompt(1, 2, 3), now_us=0)
    ix.insert(1, prompt(4, 5), now_us=5000)
    assert ix.evict(0, 1) == 1
    assert ix.match(prompt(1, 2, 3), now_us=0)[0] == 2
    assert ix.evict(None, 2) == 2                  # globally oldest: inst 0
    assert ix.instance_stats(0)["blocks"] == 0
    assert ix.set_capacity(1, 1) == 1
    assert ix.instance_stats(1)["capacity"] == 1
    assert ix.remove(1, prompt(4)) == 1
    assert ix.stats()["entries"] == 0
    assert ix.evict(None, 5) == 0
    ix.check_integrity()


def test_lru_order_most_recent_first():
    ix = idx()
    a, b = prompt(1, 2), prompt(3)
    ix.insert(0, a, now_us=0)
    ix.insert(0, b, now_us=1000)
    ha, hb = block_hashes(a, BS), block_hashes(b, BS)
    assert ix.lru(0, "approx") == hb + ha
    assert ix.lru(0, "precise") == []


def test_invalid_arguments_raise_value_errors():
    with pytest.raises(ValueError):
        PrefixIndex(0, BS, 10)
    with pytest.raises(ValueError):
        PrefixIndex(5000, BS, 10)                 # over OMNI_INDEX_MAX_INSTANCES
    with pytest.raises(ValueError):
        PrefixIndex(2, 0, 10)
    ix = idx()
    with pytest.raises(ValueError):
        ix.insert(4, prompt(1), now_us=0)
    with pytest.raises(ValueError):
        ix.insert_hashes(0, [0], now_us=0)        # 0 is never a block hash


def test_default_clock_and_config():
    # TTLs and ages have ~1 ms resolution (units of 1024 us): 2500 us is 3
    ticks = iter(range(0, 10**9, 2000))
    ix = idx(clock=lambda: next(ticks), approx_ttl_us=2500)
    ix.insert(0, prompt(1))                       # t=0
    assert ix.match(prompt(1))[0] == 1            # t=2000: 1 unit old
    assert ix.expire() == 1                       # t=4000: 3 units old
    assert ix.match(prompt(1))[0] == 0            # t=6000
    c = ix.config
    assert (c["max_entries"], c["max_nodes"], c["instance_capacity"]) == (400, 400, 100)


def test_bytes_per_entry_at_64_instances():
    cfg = ffi.new("omni_index_cfg_t *", {"max_instances": 64, "block_size": 16,
                                          "instance_capacity": 100_000})
    size = lib.omni_index_size(cfg)
    assert size / (64 * 100_000) <= 64


def test_init_in_place_attach_and_integrity_catches_corruption():
    cfg = ffi.new("omni_index_cfg_t *", {"max_instances": 4, "block_size": BS,
                                          "instance_capacity": 50})
    size = lib.omni_index_size(cfg)
    buf = ffi.new("uint64_t[]", size // 8 + 1)
    out = ffi.new("omni_index_t **")
    assert lib.omni_index_init(buf, size - 8, cfg, out) == lib.OMNI_ERANGE
    assert lib.omni_index_init(buf, size, cfg, out) == lib.OMNI_OK
    h = out[0]
    assert lib.omni_index_attach(buf, size) == h
    hashes = ffi.new("uint64_t[]", block_hashes(prompt(1, 2, 3), BS))
    assert lib.omni_index_insert(h, 1, hashes, 3, 0) == 3
    assert lib.omni_index_check_integrity(h) == lib.OMNI_OK
    # scribble over the second half (records and tables): must be noticed
    raw = ffi.cast("uint8_t *", buf)
    for i in range(size // 2, size // 2 + 4096):
        raw[i] = 0xA5
    assert lib.omni_index_check_integrity(h) == lib.OMNI_EINTEGRITY
    # and a layout the library does not know is not attached
    raw[0] ^= 0xFF
    assert lib.omni_index_attach(buf, size) == ffi.NULL


def test_integrity_error_is_typed():
    from omni_ctl.scoring.errors import check
    with pytest.raises(IntegrityError):
        check(lib.OMNI_EINTEGRITY)
    with pytest.raises(RuntimeError):
        check(lib.OMNI_EINTEGRITY)


def test_hugepage_mapping_behaves_the_same():
    a, b = idx(hugepages=True), idx()
    for ix in (a, b):
        ix.insert(0, prompt(1, 2, 3), now_us=0)
        ix.apply_stored(1, [5, 6], None, prompt(1, 2), now_us=0)
        ix.check_integrity()
    assert a.match(prompt(1, 2, 3), now_us=0) == b.match(prompt(1, 2, 3),
                                                          now_us=0)
    assert a.stats() == b.stats()
