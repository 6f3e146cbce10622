"""The C prefix index against a small pure-Python model of the same rules.

Hypothesis drives both with the same random sequences of approximate inserts,
KV-event stores/removals/clears, removals, matches, evictions, capacity
changes and expiry, and asserts after every step: equal return values, equal
match answers, equal per-instance counts, equal LRU lists (order included),
and ``check_integrity()`` (a real recount inside C).

The model is deliberately naive (dicts and Python lists, linear scans): its
job is to state the rules of omni_index.h plainly, not to be fast.
"""

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_ctl.scoring import PrefixIndex, block_hashes, block_hashes_from
from omni_ctl.scoring.errors import NotFoundError

PRECISE, APPROX = 0, 1
KIND_NAMES = {PRECISE: "precise", APPROX: "approx"}


def stamp(now_us):
    return (now_us >> 10) & 0xFFFFFFFF


def older(a, b):
    """a is strictly older than b, wrap-safe (as omni_index_older)."""
    d = (b - a) & 0xFFFFFFFF
    return 0 < d < 0x80000000


class Entry:
    __slots__ = ("kind", "eh", "stamp")

    def __init__(self, kind, eh, st_):
        self.kind = kind
        self.eh = eh
        self.stamp = st_


class ModelIndex:
    """The rules of omni_index.h, stated naively."""

    def __init__(self, n, block_size, cap, max_entries, max_nodes, ttl_us,
                 seed=0):
        self.n = n
        self.bs = block_size
        self.seed = seed
        self.max_entries = max_entries or n * cap
        self.max_nodes = min(max_nodes or self.max_entries, self.max_entries)
        self.cap = [min(cap, self.max_entries) if cap else self.max_entries] * n
        self.ttl = ((ttl_us + 1023) >> 10) if ttl_us else 0
        self.entries = {}                       # (inst, hash) -> Entry
        self.lists = [[[], []] for _ in range(n)]   # [inst][kind], MRU first
        self.eng = {}                           # (inst, engine hash) -> hash

    # -- helpers

    def count(self, i):
        return len(self.lists[i][0]) + len(self.lists[i][1])

    def nodes(self):
        return len({h for (_, h) in self.entries})

    def drop(self, i, h):
        e = self.entries.pop((i, h))
        self.lists[i][e.kind].remove(h)
        if e.kind == PRECISE:
            del self.eng[(i, e.eh)]

    def tail(self, i, k):
        lst = self.lists[i][k]
        return (lst[-1], self.entries[(i, lst[-1])].stamp) if lst else None

    def inst_victim(self, i):
        a, p = self.tail(i, APPROX), self.tail(i, PRECISE)
        if a is None:
            return None if p is None else (i, p[0])
        if p is None:
            return (i, a[0])
        return (i, p[0]) if older(p[1], a[1]) else (i, a[0])

    def global_victim(self):
        best = None
        for i in range(self.n):
            for k in (APPROX, PRECISE):
                t = self.tail(i, k)
                if t is None:
                    continue
                if best is None or older(t[1], best[1]):
                    best = ((i, t[0]), t[1])
        return None if best is None else best[0]

    def link(self, i, h, prev):
        k = self.entries[(i, h)].kind
        lst = self.lists[i][k]
        if (prev is not None and prev != (i, h)
                and self.entries[prev].kind == k):
            lst.insert(lst.index(prev[1]) + 1, h)
        else:
            lst.insert(0, h)

    def expire_inst(self, i, now):
        if not self.ttl:
            return 0
        got = 0
        while self.lists[i][APPROX]:
            h = self.lists[i][APPROX][-1]
            age = (now - self.entries[(i, h)].stamp) & 0xFFFFFFFF
            if age >= 0x80000000 or age < self.ttl:
                break
            self.drop(i, h)
            got += 1
        return got

    def upsert(self, i, h, kind, eh, prev, now):
        e = self.entries.get((i, h))
        if e is not None:
            self.lists[i][e.kind].remove(h)
            if kind == PRECISE:
                if e.kind == APPROX:
                    e.kind = PRECISE
                    e.eh = eh
                    self.eng[(i, eh)] = h
                elif e.eh != eh:
                    del self.eng[(i, e.eh)]
                    e.eh = eh
                    self.eng[(i, eh)] = h
            e.stamp = now
            self.link(i, h, prev)
            return (i, h)

        if self.cap[i] == 0:
            return None
        while self.count(i) >= self.cap[i]:
            v = self.inst_victim(i)
            if v == prev:
                return None
            self.drop(*v)
        while len(self.entries) >= self.max_entries:
            v = self.global_victim()
            if v == prev:
                return None
            self.drop(*v)
        if not any(hh == h for (_, hh) in self.entries):
            while self.nodes() >= self.max_nodes:
                v = self.global_victim()
                if v == prev:
                    return None
                self.drop(*v)
        self.entries[(i, h)] = Entry(kind, eh if kind == PRECISE else 0, now)
        if kind == PRECISE:
            self.eng[(i, eh)] = h
        self.link(i, h, prev)
        return (i, h)

    # -- operations (same answers as the C functions)

    def insert(self, i, tokens, now_us):
        now = stamp(now_us)
        self.expire_inst(i, now)
        prev = None
        hashes = block_hashes(tokens, self.bs, self.seed)
        for k, h in enumerate(hashes):
            prev = self.upsert(i, h, APPROX, 0, prev, now)
            if prev is None:
                return k
        return len(hashes)

    def store(self, i, ehs, parent, tokens, now_us):
        now = stamp(now_us)
        self.expire_inst(i, now)
        if parent is not None:
            if (i, parent) not in self.eng:
                return "notfound"
            chain = block_hashes_from(self.eng[(i, parent)], tokens, self.bs)
        else:
            chain = block_hashes(tokens, self.bs, self.seed)
        prev = None
        for k, (h, eh) in enumerate(zip(chain, ehs)):
            m = self.eng.get((i, eh))
            if m is not None and m != h:
                if prev == (i, m):
                    prev = None
                self.drop(i, m)
            prev = self.upsert(i, h, PRECISE, eh, prev, now)
            if prev is None:
                return k
        return len(ehs)

    def store_removed(self, i, ehs):
        got = 0
        for eh in ehs:
            h = self.eng.get((i, eh))
            if h is not None:
                self.drop(i, h)
                got += 1
        return got

    def remove(self, i, tokens):
        got = 0
        for h in block_hashes(tokens, self.bs, self.seed):
            if (i, h) in self.entries:
                self.drop(i, h)
                got += 1
        return got

    def clear(self, i):
        keys = [(i, h) for k in (0, 1) for h in self.lists[i][k]]
        for key in keys:
            self.drop(*key)
        return len(keys)

    def expire(self, now_us):
        return sum(self.expire_inst(i, stamp(now_us)) for i in range(self.n))

    def match(self, tokens, now_us):
        self.expire(now_us)
        hashes = block_hashes(tokens, self.bs, self.seed)
        out = []
        for i in range(self.n):
            c = 0
            while c < len(hashes) and (i, hashes[c]) in self.entries:
                c += 1
            out.append(c)
        return out

    def set_capacity(self, i, c):
        self.cap[i] = c
        got = 0
        while self.count(i) > c:
            self.drop(*self.inst_victim(i))
            got += 1
        return got

    def evict(self, i, n):
        got = 0
        for _ in range(n):
            v = self.global_victim() if i is None else self.inst_victim(i)
            if v is None:
                break
            self.drop(*v)
            got += 1
        return got


# ---- strategies -------------------------------------------------------------

BS = 2
tokens_st = st.lists(st.integers(0, 2), max_size=12)
dt_st = st.integers(0, 3000)


def engine_hash(prefix, salt):
    """A stand-in for an engine's block hash: a function of the prefix."""
    raw = struct.pack(f"<{len(prefix)}I", *prefix) + bytes([salt])
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(),
                          "little")


def ops_st(n):
    inst = st.integers(0, n - 1)
    return st.lists(st.one_of(
        st.tuples(st.just("insert"), inst, tokens_st, dt_st),
        # a store as an engine would send it: blocks from `split` on, the
        # parent being the block before (which the instance may not hold)
        st.tuples(st.just("store"), inst, tokens_st, st.integers(0, 6),
                  st.integers(0, 1), dt_st),
        # a store with arbitrary small engine hashes: duplicates, remaps
        st.tuples(st.just("store_raw"), inst, tokens_st,
                  st.lists(st.integers(0, 5), max_size=6),
                  st.one_of(st.none(), st.integers(0, 5)), dt_st),
        st.tuples(st.just("removed"), inst, st.lists(st.integers(0, 5),
                                                     max_size=3)),
        st.tuples(st.just("removed_prefix"), inst, tokens_st,
                  st.integers(0, 1)),
        st.tuples(st.just("remove"), inst, tokens_st),
        st.tuples(st.just("clear"), inst),
        st.tuples(st.just("match"), tokens_st, dt_st),
        st.tuples(st.just("evict"), st.one_of(st.none(), inst),
                  st.integers(0, 3)),
        st.tuples(st.just("capacity"), inst, st.integers(0, 8)),
        st.tuples(st.just("expire"), dt_st),
    ), max_size=40)


def run_both(ix, model, op, now):
    kind = op[0]
    if kind == "insert":
        _, i, toks, _ = op
        return ix.insert(i, toks, now_us=now), model.insert(i, toks, now)
    if kind == "store":
        _, i, toks, split, salt, _ = op
        nb = len(toks) // BS
        split = min(split, nb)
        ehs = [engine_hash(toks[:(k + 1) * BS], salt) for k in range(split, nb)]
        parent = engine_hash(toks[:split * BS], salt) if split else None
        body = toks[split * BS:nb * BS]
        return call_store(ix, i, ehs, parent, body, now), \
            model.store(i, ehs, parent, body, now)
    if kind == "store_raw":
        _, i, toks, ehs, parent, _ = op
        nb = min(len(toks) // BS, len(ehs))
        ehs = ehs[:nb]
        body = toks[:nb * BS]
        return call_store(ix, i, ehs, parent, body, now), \
            model.store(i, ehs, parent, body, now)
    if kind == "removed":
        _, i, ehs = op
        return ix.apply_removed(i, ehs), model.store_removed(i, ehs)
    if kind == "removed_prefix":
        _, i, toks, salt = op
        nb = len(toks) // BS
        ehs = [engine_hash(toks[:(k + 1) * BS], salt) for k in range(nb)]
        ehs.reverse()                     # engines evict leaves first
        return ix.apply_removed(i, ehs), model.store_removed(i, ehs)
    if kind == "remove":
        _, i, toks = op
        return ix.remove(i, toks), model.remove(i, toks)
    if kind == "clear":
        _, i = op
        return ix.apply_cleared(i), model.clear(i)
    if kind == "match":
        _, toks, _ = op
        return ix.match(toks, now_us=now), model.match(toks, now)
    if kind == "evict":
        _, i, n = op
        return ix.evict(i, n), model.evict(i, n)
    if kind == "capacity":
        _, i, c = op
        return ix.set_capacity(i, c), model.set_capacity(i, c)
    if kind == "expire":
        return ix.expire(now_us=now), model.expire(now)
    raise AssertionError(kind)


def call_store(ix, i, ehs, parent, body, now):
    try:
        return ix.apply_stored(i, ehs, parent, body, now_us=now)
    except NotFoundError:
        return "notfound"


def assert_same(ix, model):
    ix.check_integrity()
    st_ = ix.stats()
    assert st_["entries"] == len(model.entries)
    assert st_["nodes"] == model.nodes()
    assert st_["precise"] == len(model.eng)
    for i in range(model.n):
        for k in (PRECISE, APPROX):
            assert ix.lru(i, KIND_NAMES[k]) == model.lists[i][k], (i, k)
        s = ix.instance_stats(i)
        assert s["blocks"] == model.count(i)
        assert s["capacity"] == model.cap[i]


def _check(params, ops):
    n, cap, max_entries, max_nodes, ttl = params
    ix = PrefixIndex(n, BS, cap, global_capacity=max_entries,
                     max_nodes=max_nodes, approx_ttl_us=ttl)
    model = ModelIndex(n, BS, cap, max_entries, max_nodes, ttl)
    assert ix.config["max_entries"] == model.max_entries
    assert ix.config["max_nodes"] == model.max_nodes
    now = 5_000_000
    for op in ops:
        if op[-1] is not None and op[0] in ("insert", "store", "store_raw",
                                             "match", "expire"):
            now += op[-1]
        got, want = run_both(ix, model, op, now)
        assert got == want, op
        assert_same(ix, model)


params_st = st.tuples(
    st.integers(1, 4),                       # instances
    st.integers(1, 8),                       # per-instance capacity
    st.sampled_from([0, 3, 6, 12]),          # global capacity (0: default)
    st.sampled_from([0, 2, 5]),              # node capacity (0: default)
    st.sampled_from([0, 2048, 6000]),        # approximate TTL (us)
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(params=params_st, data=st.data())
def test_index_matches_model(params, data):
    ops = data.draw(ops_st(params[0]))
    _check(params, ops)


# A few fixed sequences that hit the corners every run, whatever hypothesis
# draws (regression seeds for the rules above).

def test_model_fixed_capacity_truncation():
    # capacity 2 and a 4-block prompt: the insert stops instead of evicting
    # the block it extends
    _check((1, 2, 0, 0, 0), [("insert", 0, [0, 1] * 4, 0),
                             ("match", [0, 1] * 4, 0)])


def test_model_fixed_remap_and_orphan():
    _check((2, 4, 0, 0, 0), [
        ("store_raw", 0, [1, 1, 2, 2], [3, 3], None, 0),   # duplicate eh
        ("store_raw", 0, [2, 2], [4], 3, 10),
        ("store_raw", 1, [2, 2], [4], 3, 10),              # orphan on 1
        ("removed", 0, [3, 4, 5]),
        ("match", [1, 1, 2, 2, 2, 2], 0),
    ])


def test_model_fixed_ttl_and_global():
    _check((3, 4, 5, 3, 2048), [
        ("insert", 0, [0, 0, 1, 1], 0),
        ("insert", 1, [0, 0, 2, 2], 1000),
        ("store", 2, [0, 0, 1, 1, 2, 2], 0, 0, 1000),
        ("match", [0, 0, 1, 1, 2, 2], 1500),
        ("expire", 3000),
        ("evict", None, 2),
        ("match", [0, 0, 1, 1, 2, 2], 0),
    ])


@pytest.mark.parametrize("seed", range(3))
def test_model_random_long_sequences(seed):
    """Longer sequences than hypothesis draws, at bigger sizes."""
    import random
    rnd = random.Random(seed)
    n = 5
    params = (n, 10, 30, 20, 4096)
    ops = []
    for _ in range(400):
        toks = [rnd.randrange(3) for _ in range(rnd.randrange(0, 16))]
        i = rnd.randrange(n)
        r = rnd.random()
        if r < 0.35:
            ops.append(("insert", i, toks, rnd.randrange(2000)))
        elif r < 0.6:
            ops.append(("store", i, toks, rnd.randrange(4), rnd.randrange(2),
                        rnd.randrange(2000)))
        elif r < 0.7:
            ops.append(("removed_prefix", i, toks, rnd.randrange(2)))
        elif r < 0.85:
            ops.append(("match", toks, rnd.randrange(2000)))
        elif r < 0.9:
            ops.append(("evict", rnd.choice([None, i]), rnd.randrange(3)))
        elif r < 0.95:
            ops.append(("capacity", i, rnd.randrange(4, 12)))
        else:
            ops.append(("clear", i))
    _check(params, ops)
