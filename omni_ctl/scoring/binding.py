"""Pythonic layer over the scoring library (nginx_modules/scoring).

The same C code runs inside nginx on the request path; this module exposes it
to Python for tests, the tokenizer service (block hashes), the KV-event agent
and offline what-if analysis.

- :func:`block_hashes`: chained 64-bit hashes of a prompt's full blocks.
- :class:`PrefixIndex`: which instance holds which blocks (precise from KV
  events, approximate from what the proxy dispatched), with per-instance and
  global capacities and LRU eviction; one walk matches a prompt against every
  instance.
- :class:`Predictor`: per-instance online models of prefill and decode step
  time, and the predicted moment each instance is free.
- Policies, the functions the nginx module calls: :func:`decide_prefill`
  (with :func:`prepare_prefill`, :func:`add_prefill_delay`,
  :func:`choose_prefill`), :func:`place_decode`, :func:`queue_work`,
  :func:`queue_key`, :func:`queue_next`, :func:`queue_pick`,
  :func:`queue_order`, :class:`Arrivals`, :func:`pick_now`.
- The JSON scanner/splicer of :mod:`omni_ctl.scoring.jsonscan` (``json_edit``...)
  is re-exported here.

Library handles are owned with ``ffi.gc`` (freed with the Python object).
Negative library codes become the exceptions of
:mod:`omni_ctl.scoring.errors`, which also subclass the matching builtins
(``ValueError``, ``LookupError``, ...).

Time is always an argument (``now_us``, microseconds of a monotonic clock).
Where it is left out, the object's ``clock`` (default: ``time.monotonic``)
is read; tests pass explicit times and never sleep.
"""

import mmap
import time
from dataclasses import dataclass

from ._scoring import ffi, lib
from .errors import check
from .jsonscan import *                         # noqa: F401,F403
from .jsonscan import __all__ as _json_all

__all__ = [
    "ffi",
    "lib",
    "MASK64",
    "block_hashes",
    "block_hashes_from",
    "text_block_hashes",
    "hash_root",
    "engine_key",
    "PrefixIndex",
    "IngestTarget",
    "Predictor",
    "PrefillJob",
    "PrefillCandidate",
    "Decision",
    "DecodeJob",
    "DecodeInstance",
    "QueueItem",
    "prepare_prefill",
    "add_prefill_delay",
    "choose_prefill",
    "decide_prefill",
    "place_decode",
    "place_decode_tpot",
    "queue_work",
    "queue_key",
    "queue_next",
    "queue_order",
    "queue_pick",
    "SloItem",
    "SloPick",
    "slo_starved",
    "slo_next",
    "slo_admit",
    "retry_after",
    "Arrivals",
    "PickCandidate",
    "pick_now",
] + list(_json_all)

MASK64 = (1 << 64) - 1

_ALLOC = lib.omni_malloc_allocator()

# Output arrays are written by C before they are read: skip the zeroing.
_new_raw = ffi.new_allocator(should_clear_after_alloc=False)


def _default_clock():
    return time.monotonic_ns() // 1000


def _u32s(token_ids):
    """token_ids as a C uint32_t array (no copy for 4-byte buffers)."""
    if isinstance(token_ids, (bytes, bytearray, str)):
        raise TypeError("token ids are a sequence of ints, not text")
    try:
        view = memoryview(token_ids)
    except TypeError:
        view = None
    if (view is not None and view.itemsize == 4
            and view.format in ("I", "L", "=I", "<I")):
        return ffi.from_buffer("uint32_t[]", token_ids), len(view)
    try:
        arr = ffi.new("uint32_t[]", list(token_ids))
    except OverflowError as exc:
        raise ValueError(f"token ids must be in [0, 2**32): {exc}") from None
    return arr, len(arr)


def _u64s(values, what="hash"):
    values = list(values)
    try:
        return ffi.new("uint64_t[]", [v & MASK64 for v in values]), len(values)
    except TypeError:
        raise TypeError(f"{what} values must be ints") from None


# ---- hashing ----------------------------------------------------------------

def hash_root(seed=0):
    """The parent hash of a prompt's first block in namespace ``seed``."""
    return lib.omni_hash_root(seed & MASK64)


def block_hashes(token_ids, block_size, seed=0):
    """Chained hashes of the full blocks of ``token_ids`` (one per block)."""
    tokens, n = _u32s(token_ids)
    cap = n // block_size if block_size > 0 else 0
    out = _new_raw("uint64_t[]", max(cap, 1))
    got = check(lib.omni_hash_blocks(tokens, n, block_size, seed & MASK64,
                                     out, cap), "block_hashes")
    return list(out[0:got])


def block_hashes_from(parent, token_ids, block_size):
    """Chained hashes of full blocks that continue the block ``parent``."""
    tokens, n = _u32s(token_ids)
    cap = n // block_size if block_size > 0 else 0
    out = _new_raw("uint64_t[]", max(cap, 1))
    got = check(lib.omni_hash_blocks_from(parent & MASK64, tokens, n,
                                          block_size, out, cap),
                "block_hashes_from")
    return list(out[0:got])


def text_block_hashes(text, block_size, seed=0):
    """Hashes of a text prompt cut into pseudo tokens (4 bytes each, LE).

    Equal to :func:`block_hashes` over those pseudo tokens; ``str`` is encoded
    as UTF-8.
    """
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    buf = ffi.from_buffer("uint8_t[]", text)
    cap = len(buf) // (4 * block_size) if block_size > 0 else 0
    out = _new_raw("uint64_t[]", max(cap, 1))
    got = check(lib.omni_hash_text_blocks(buf, len(buf), block_size,
                                          seed & MASK64, out, cap),
                "text_block_hashes")
    return list(out[0:got])


def engine_key(value):
    """An engine block hash as the index's 64-bit key.

    ints are taken modulo 2**64 (so signed and unsigned forms agree); bytes
    are hashed (KV events may carry raw digests).
    """
    if isinstance(value, int):
        return value & MASK64
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return lib.omni_hash_engine_key(data, len(data))
    raise TypeError("engine hash must be int or bytes, not "
                    f"{type(value).__name__}")


# ---- prefix index -----------------------------------------------------------

_KINDS = {"precise": 0, "approx": 1}


def _index_free(handle):
    lib.omni_index_free(handle, _ALLOC)


class PrefixIndex:
    """Which instance holds which blocks; see omni_index.h for the model.

    ``PrefixIndex(num_instances, block_size, capacity_blocks)`` holds up to
    ``capacity_blocks`` blocks per instance.  Keyword options:
    ``global_capacity`` ((block, instance) entries in all; default
    num_instances * capacity_blocks), ``max_nodes`` (distinct blocks; default
    global_capacity), ``seed`` (hash namespace), ``approx_ttl_us`` (approximate
    entries expire; 0 never), ``clock`` (a callable returning microseconds,
    read when an operation is given no ``now_us``) and ``hugepages`` (build
    the index in place in a private anonymous mapping advised for
    transparent huge pages: fewer TLB misses on large indexes; where the
    kernel declines, it is ordinary memory).
    """

    def __init__(self, num_instances, block_size, capacity_blocks, *,
                 global_capacity=0, max_nodes=0, seed=0, approx_ttl_us=0,
                 clock=None, hugepages=False):
        if block_size <= 0:
            check(lib.OMNI_EINVAL, "block_size must be > 0")
        if capacity_blocks <= 0 and global_capacity <= 0:
            check(lib.OMNI_EINVAL, "capacity_blocks must be > 0")
        if min(num_instances, capacity_blocks, global_capacity, max_nodes,
               approx_ttl_us) < 0:
            check(lib.OMNI_EINVAL, "sizes must not be negative")
        cfg = ffi.new("omni_index_cfg_t *", {
            "max_instances": num_instances,
            "block_size": block_size,
            "seed": seed & MASK64,
            "instance_capacity": capacity_blocks,
            "max_entries": global_capacity,
            "max_nodes": max_nodes,
            "approx_ttl_us": approx_ttl_us,
        })
        if hugepages:
            self._h = self._new_in_mapping(cfg)
        else:
            rc = ffi.new("int *")
            self._h = ffi.gc(lib.omni_index_new(cfg, _ALLOC, rc), _index_free)
            check(rc[0], "PrefixIndex")
        self._cfg = ffi.new("omni_index_cfg_t *")
        lib.omni_index_get_cfg(self._h, self._cfg)
        self.num_instances = num_instances
        self.block_size = block_size
        self.seed = seed & MASK64
        self.clock = clock or _default_clock
        self._match_out = ffi.new("uint32_t[]", num_instances)

    _HUGE = 2 << 20

    def _new_in_mapping(self, cfg):
        """omni_index_init() in a 2 MiB-aligned anonymous mapping owned by
        this object (freed with it; no library allocation to release)."""
        size = lib.omni_index_size(cfg)
        if size == 0:
            check(lib.OMNI_EINVAL, "PrefixIndex")
        # private: a shared anonymous mapping is shmem, whose THP policy is
        # separate (/sys/kernel/mm/transparent_hugepage/shmem_enabled; it is
        # what nginx's shared zone gets)
        self._map = mmap.mmap(-1, size + self._HUGE,
                              flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advise = getattr(mmap, "MADV_HUGEPAGE", None)
        if advise is not None:
            try:
                self._map.madvise(advise)
            except OSError:
                pass                    # THP off: plain pages
        base = ffi.from_buffer(self._map)
        skew = int(ffi.cast("uintptr_t", base)) % self._HUGE
        self._mem = base                # keeps the buffer export alive
        out = ffi.new("omni_index_t **")
        check(lib.omni_index_init(base + (self._HUGE - skew) % self._HUGE,
                                  size, cfg, out), "PrefixIndex")
        return out[0]

    # -- helpers

    def _now(self, now_us):
        return self.clock() if now_us is None else now_us

    def _hashes(self, token_ids):
        return block_hashes(token_ids, self.block_size, self.seed)

    @property
    def config(self):
        """The resolved configuration (defaults filled in) as a dict."""
        c = self._cfg
        return {
            "max_instances": c.max_instances,
            "block_size": c.block_size,
            "seed": c.seed,
            "instance_capacity": c.instance_capacity,
            "max_entries": c.max_entries,
            "max_nodes": c.max_nodes,
            "approx_ttl_us": c.approx_ttl_us,
        }

    @property
    def nbytes(self):
        """Bytes of the one memory block the index lives in."""
        return lib.omni_index_size(self._cfg)

    # -- queries

    def match(self, token_ids, now_us=None):
        """Leading full blocks of ``token_ids`` held, per instance."""
        tokens, n = _u32s(token_ids)
        out = self._match_out
        check(lib.omni_index_match_prefix_tokens(
            self._h, tokens, n, self._now(now_us), out, self.num_instances),
            "match")
        return list(out)

    def match_hashes(self, hashes, now_us=None):
        """:meth:`match` for precomputed block hashes."""
        arr, n = _u64s(hashes)
        out = self._match_out
        check(lib.omni_index_match_prefix(self._h, arr, n, self._now(now_us),
                                          out, self.num_instances), "match")
        return list(out)

    def stats(self):
        """Whole-index counters as a dict (see omni_index_stats_t)."""
        s = ffi.new("omni_index_stats_t *")
        lib.omni_index_stats(self._h, s)
        return {name: getattr(s, name) for name, _ in
                ffi.typeof("omni_index_stats_t").fields}

    def instance_stats(self, instance):
        s = ffi.new("omni_index_instance_t *")
        check(lib.omni_index_instance_stats(self._h, instance, s),
              "instance_stats")
        return {name: getattr(s, name) for name, _ in
                ffi.typeof("omni_index_instance_t").fields}

    def lru(self, instance, kind="approx"):
        """Block hashes of one LRU list of ``instance``, most recent first."""
        k = _KINDS[kind]
        n = check(lib.omni_index_lru(self._h, instance, k, ffi.NULL, 0), "lru")
        out = _new_raw("uint64_t[]", max(n, 1))
        got = check(lib.omni_index_lru(self._h, instance, k, out, n), "lru")
        return list(out[0:min(got, n)])

    def check_integrity(self):
        """Recount everything; raises IntegrityError on a broken invariant."""
        check(lib.omni_index_check_integrity(self._h), "check_integrity")

    # -- approximate

    def insert(self, instance, token_ids, now_us=None):
        """Record that ``instance`` was sent this prompt.  Returns the number
        of leading blocks now held (fewer only under capacity pressure)."""
        return self.insert_hashes(instance, self._hashes(token_ids), now_us)

    def insert_hashes(self, instance, hashes, now_us=None):
        arr, n = _u64s(hashes)
        return check(lib.omni_index_insert(self._h, instance, arr, n,
                                           self._now(now_us)), "insert")

    def remove(self, instance, token_ids):
        """Drop ``instance``'s entries for this prompt's blocks."""
        return self.remove_hashes(instance, self._hashes(token_ids))

    def remove_hashes(self, instance, hashes):
        arr, n = _u64s(hashes)
        return check(lib.omni_index_remove(self._h, instance, arr, n),
                     "remove")

    def withdraw(self, instance, token_ids):
        """Drop ``instance``'s approximate entries for this prompt's blocks
        (the engine refused it); precise ones stay."""
        return self.withdraw_hashes(instance, self._hashes(token_ids))

    def withdraw_hashes(self, instance, hashes):
        arr, n = _u64s(hashes)
        return check(lib.omni_index_withdraw(self._h, instance, arr, n),
                     "withdraw")

    # -- precise (KV events)

    def apply_stored(self, instance, engine_hashes, parent_engine_hash,
                     token_ids, now_us=None):
        """BlockStored.  ``parent_engine_hash`` None: a prompt's first block.
        Returns blocks stored; raises NotFoundError (a LookupError) when the
        parent is unknown for this instance (nothing is stored)."""
        keys, n = _u64s([engine_key(h) for h in engine_hashes])
        tokens, n_tokens = _u32s(token_ids)
        has_parent = parent_engine_hash is not None
        parent = engine_key(parent_engine_hash) if has_parent else 0
        return check(lib.omni_index_store(
            self._h, instance, keys, n, int(has_parent), parent, tokens,
            n_tokens, self._now(now_us)), "apply_stored")

    def apply_removed(self, instance, engine_hashes):
        """BlockRemoved.  Returns how many of the hashes were known."""
        keys, n = _u64s([engine_key(h) for h in engine_hashes])
        return check(lib.omni_index_store_removed(self._h, instance, keys, n),
                     "apply_removed")

    def apply_cleared(self, instance):
        """AllBlocksCleared: drop every entry of ``instance``."""
        return check(lib.omni_index_clear(self._h, instance), "apply_cleared")

    # -- capacity

    def set_capacity(self, instance, capacity):
        return check(lib.omni_index_set_capacity(self._h, instance, capacity),
                     "set_capacity")

    def evict(self, instance=None, n=1):
        """Evict up to ``n`` LRU entries of ``instance`` (None: globally)."""
        inst = lib.OMNI_INDEX_ALL if instance is None else instance
        return check(lib.omni_index_evict(self._h, inst, n), "evict")

    def expire(self, now_us=None):
        return check(lib.omni_index_expire(self._h, self._now(now_us)),
                     "expire")


# ---- ingestion of the KV-event agent's batches -------------------------------

_INGEST_MODES = {0: "unknown", 1: "precise", 2: "approx"}
_INGEST_HEALTH = {0: "unknown", 1: "up", 2: "down"}


class IngestTarget:
    """A :class:`PrefixIndex` fed with agent batches (see omni_ingest.h):
    what the nginx ingestion endpoint does, for tests and offline replays.

    ``names`` maps the batch's instance names ("host:port") to index
    instances.  :meth:`apply` returns the records applied and raises
    InvalidArgumentError for a malformed batch (counted in :meth:`stats`).
    With a :class:`Predictor` (its instances the index's), every block
    stored is handed to it: a prefill's last block tells its end
    (omni_ingest_apply_to, :meth:`Predictor.prefill_stored`).
    """

    def __init__(self, index, names, predictor=None):
        self.index = index
        self.predictor = predictor
        self._names = ffi.new("omni_ingest_name_t[]", max(len(names), 1))
        self._keep = []
        for k, (name, inst) in enumerate(dict(names).items()):
            raw = ffi.new("char[]", name.encode())
            self._keep.append(raw)
            self._names[k].name = raw
            self._names[k].len = len(name.encode())
            self._names[k].inst = inst
        self._n_names = len(names)
        self._insts = ffi.new("omni_ingest_inst_t[]", index.num_instances)
        self._stats = ffi.new("omni_ingest_stats_t *")

    def apply(self, batch, now_us=None):
        data = bytes(batch)
        rc = lib.omni_ingest_apply_to(
            self.index._h,
            self.predictor._h if self.predictor is not None else ffi.NULL,
            self._insts, self.index.num_instances,
            self._names, self._n_names, data, len(data),
            self.index._now(now_us), self._stats)
        if rc < 0:
            reason = ffi.string(lib.omni_ingest_strreason(
                self._stats.last_reason)).decode()
            check(rc, f"ingest: {reason} (offset {self._stats.last_offset})")
        return rc

    def expire(self, ttl_us, now_us=None):
        """Instances silent past ``ttl_us`` turn approximate."""
        return check(lib.omni_ingest_expire(
            self.index._h, self._insts, self.index.num_instances,
            self.index._now(now_us),
            ttl_us), "ingest expire")

    def discount(self, matched):
        """The matched prefix per instance (blocks) as the scheduler weighs
        it: approximate instances' divided (omni_ingest_discount)."""
        arr = ffi.new("uint32_t[]", list(matched) or [0])
        check(lib.omni_ingest_discount(self._insts, self.index.num_instances,
                                       arr, len(matched)), "ingest discount")
        return list(arr)[:len(matched)]

    def note_ours(self, ours):
        """Our own figure per instance at the moment the load reports just
        applied were taken (omni_ingest_note_ours); returns how many."""
        arr = ffi.new("uint32_t[]", list(ours) or [0])
        return check(lib.omni_ingest_note_ours(
            self._insts, min(len(ours), self.index.num_instances), arr),
            "ingest note ours")

    def blend_running(self, inst, proxy_running, ttl_us, now_us=None):
        """The running figure the scheduler uses for ``inst``
        (omni_ingest_blend_running)."""
        if not 0 <= inst < self.index.num_instances:
            raise IndexError(inst)
        return lib.omni_ingest_blend_running(
            ffi.addressof(self._insts, inst), proxy_running,
            self.index._now(now_us), ttl_us)

    def instance(self, inst):
        if not 0 <= inst < self.index.num_instances:
            raise IndexError(inst)
        s = self._insts[inst]
        d = {name: getattr(s, name) for name, _ in
             ffi.typeof("omni_ingest_inst_t").fields if name != "pad"}
        d["mode"] = _INGEST_MODES.get(d["mode"], d["mode"])
        d["health"] = _INGEST_HEALTH.get(d["health"], d["health"])
        return d

    def stats(self):
        d = {name: getattr(self._stats, name) for name, _ in
             ffi.typeof("omni_ingest_stats_t").fields if name != "pad"}
        d["last_reason"] = ffi.string(lib.omni_ingest_strreason(
            d["last_reason"])).decode()
        return d


# ---- predictor ------------------------------------------------------------

@dataclass(frozen=True)
class PrefillJob:
    """What :meth:`Predictor.dispatch_prefill` predicted for one request."""

    n_new: int
    n_cached: int
    dispatch_us: int
    service_us: int
    done_us: int
    start_us: int = 0
    shared: bool = False
    tail_us: int = 0        # in done_us: the trip back (and KV transfer)
    sent_at_us: int = 0     # its place in the instance's queue


def _predict_free(handle):
    lib.omni_predict_free(handle, _ALLOC)


class Predictor:
    """Per-instance online models (see omni_predict.h).

    Options (0 or None: the library's default): ``forget`` (RLS forgetting
    factor), ``prior_var`` (how quickly data overrides the priors),
    ``mape_alpha`` (weight of the newest error in the running MAPE),
    ``min_us`` (prediction floor), ``prefill_prior`` and ``decode_prior``
    (three coefficients each, in us), ``transfer`` (a prefill's answer
    comes after its KV transfer: parallel P/D).
    """

    def __init__(self, num_instances, *, forget=0, prior_var=0, mape_alpha=0,
                 min_us=0, prefill_prior=None, decode_prior=None,
                 transfer=False):
        cfg = ffi.new("omni_predict_cfg_t *", {
            "max_instances": num_instances,
            "flags": lib.OMNI_PREDICT_TRANSFER if transfer else 0,
            "forget": forget,
            "prior_var": prior_var,
            "mape_alpha": mape_alpha,
            "min_us": min_us,
            "prefill_prior": list(prefill_prior or (0, 0, 0)),
            "decode_prior": list(decode_prior or (0, 0, 0)),
        })
        rc = ffi.new("int *")
        self._h = ffi.gc(lib.omni_predict_new(cfg, _ALLOC, rc), _predict_free)
        check(rc[0], "Predictor")
        self.num_instances = num_instances

    @property
    def config(self):
        c = ffi.new("omni_predict_cfg_t *")
        lib.omni_predict_get_cfg(self._h, c)
        return {
            "max_instances": c.max_instances,
            "transfer": bool(c.flags & lib.OMNI_PREDICT_TRANSFER),
            "forget": c.forget,
            "prior_var": c.prior_var,
            "mape_alpha": c.mape_alpha,
            "min_us": c.min_us,
            "prefill_prior": list(c.prefill_prior),
            "decode_prior": list(c.decode_prior),
        }

    def prefill_us(self, instance, n_new, n_cached=0):
        return check(lib.omni_predict_prefill_us(self._h, instance, n_new,
                                                 n_cached), "prefill_us")

    def decode_step_us(self, instance, batch, kv_tokens):
        return check(lib.omni_predict_decode_step_us(self._h, instance, batch,
                                                     kv_tokens),
                     "decode_step_us")

    def observe_prefill(self, instance, n_new, n_cached, service_us):
        check(lib.omni_predict_observe_prefill(self._h, instance, n_new,
                                               n_cached, int(service_us)),
              "observe_prefill")

    def observe_decode(self, instance, batch, kv_tokens, step_us):
        check(lib.omni_predict_observe_decode(self._h, instance, batch,
                                              kv_tokens, int(step_us)),
              "observe_decode")

    def dispatch_prefill(self, instance, n_new, n_cached, now_us):
        job = ffi.new("omni_predict_job_t *")
        check(lib.omni_predict_prefill_dispatch(self._h, instance, n_new,
                                                n_cached, now_us, job),
              "dispatch_prefill")
        return PrefillJob(job.n_new, job.n_cached, job.dispatch_us,
                          job.service_us, job.done_us, job.start_us,
                          bool(job.shared), job.tail_us, job.sent_at_us)

    @staticmethod
    def _job(job):
        return ffi.new("omni_predict_job_t *", {
            "n_new": job.n_new, "n_cached": job.n_cached,
            "dispatch_us": job.dispatch_us, "service_us": job.service_us,
            "done_us": job.done_us, "start_us": job.start_us,
            "shared": int(job.shared), "tail_us": job.tail_us,
            "sent_at_us": job.sent_at_us,
        })

    def prefill_done(self, instance, job, done_us, ok=True):
        check(lib.omni_predict_prefill_done(self._h, instance, self._job(job),
                                            done_us, int(bool(ok))),
              "prefill_done")

    def expect_prefill_end(self, instance, job, block_hash):
        """The engine will store the block ``block_hash`` (the index's
        hash) last for ``job``: its KV events tell the job's end."""
        check(lib.omni_predict_prefill_expect(self._h, instance,
                                              self._job(job), block_hash),
              "expect_prefill_end")

    def prefill_stored(self, instance, block_hash, now_us):
        """The engine stored ``block_hash`` at ``now_us``: True when that
        told a prefill's end and moved the prediction."""
        return bool(check(lib.omni_predict_prefill_stored(
            self._h, instance, block_hash, now_us), "prefill_stored"))

    def wait_us(self, instance, now_us):
        return check(lib.omni_predict_wait_us(self._h, instance, now_us),
                     "wait_us")

    def end_us(self, instance):
        """Predicted end of the engine's work on the prefills in flight
        there (0: none); past ``now`` when they overran it."""
        return check(lib.omni_predict_end_us(self._h, instance), "end_us")

    def answer_us(self, instance):
        """Predicted return of the last answer of the prefills in flight
        there (0: none): their end plus the last one's trip."""
        return check(lib.omni_predict_answer_us(self._h, instance),
                     "answer_us")

    def transfer_us(self, instance):
        """Parallel P/D, once the transfer's time per token is known: the
        predicted transfer (and trip) of the last prefill sent there, which
        its answer comes after the engine's end; 0 otherwise."""
        return check(lib.omni_predict_transfer_us(self._h, instance),
                     "transfer_us")

    def decode_wait_us(self, instance, batch, kv_tokens, max_batch,
                       min_remaining_tokens):
        return check(lib.omni_predict_decode_wait_us(
            self._h, instance, batch, kv_tokens, max_batch,
            min_remaining_tokens), "decode_wait_us")

    def state(self, instance):
        """Model parameters, sample counts, running errors, free time."""
        s = ffi.new("omni_predict_state_t *")
        check(lib.omni_predict_state(self._h, instance, s), "state")
        return {
            "prefill_coef": list(s.prefill_coef),
            "decode_coef": list(s.decode_coef),
            "prefill_samples": s.prefill_samples,
            "decode_samples": s.decode_samples,
            "completion_samples": s.completion_samples,
            "prefill_mape": s.prefill_mape,
            "decode_mape": s.decode_mape,
            "completion_mape": s.completion_mape,
            "free_at_us": s.free_at_us,
            "inflight": s.inflight,
            "reach_us": s.reach_us,
            "reach_per_1k_us": s.reach_per_1k_us,
            "transfer_per_1k_us": s.transfer_per_1k_us,
            "transfer_samples": s.transfer_samples,
            "transfer_told_samples": s.transfer_told_samples,
            "engine_ends": s.engine_ends,
        }

    def reset(self, instance):
        check(lib.omni_predict_reset(self._h, instance), "reset")


# ---- policies ------------------------------------------------------------

_REASONS = {
    lib.OMNI_POLICY_CHOSEN: "chosen",
    lib.OMNI_POLICY_HOLD_LIMITS: "hold-limits",
    lib.OMNI_POLICY_HOLD_BUSY: "hold-busy",
    lib.OMNI_POLICY_HOLD_NONE: "hold-none",
    lib.OMNI_POLICY_HOLD_FULL: "hold-full",
}


@dataclass
class PrefillCandidate:
    """One prefill instance's state for :func:`choose_prefill`."""

    inst: int
    cached_tokens: int = 0
    running: int = 0
    max_running: int = 0          # 0: no limit
    inflight_tokens: int = 0
    max_tokens: int = 0           # 0: no limit
    wait_us: int = 0
    prefill_us: int = 0
    healthy: bool = True
    draining: bool = False
    # the prefill bound there last (decide_prefill only); 0: none
    step_start_us: int = 0
    step_done_us: int = 0
    step_service_us: int = 0

    def _flags(self):
        return ((0 if self.healthy else lib.OMNI_POLICY_UNHEALTHY)
                | (lib.OMNI_POLICY_DRAINING if self.draining else 0))


@dataclass(frozen=True)
class Decision:
    """A policy's answer.  ``choice`` is an index into the list given, or
    None when the request must be held (``hold``)."""

    choice: object
    best: object
    reason: str
    skipped: int
    cost_us: int
    retry_us: int

    @property
    def hold(self):
        return self.choice is None

    @classmethod
    def _from_c(cls, d):
        return cls(choice=None if d.choice < 0 else d.choice,
                   best=None if d.best < 0 else d.best,
                   reason=_REASONS.get(d.reason, str(d.reason)),
                   skipped=d.skipped, cost_us=d.cost_us, retry_us=d.retry_us)


@dataclass
class DecodeJob:
    prompt_tokens: int
    output_tokens: int
    arrival_us: int = 0


@dataclass
class DecodeInstance:
    inst: int
    running: int = 0
    max_running: int = 0          # 0: no limit
    load_tokens: int = 0
    max_tokens: int = 0           # 0: no limit
    healthy: bool = True
    draining: bool = False

    def _flags(self):
        return ((0 if self.healthy else lib.OMNI_POLICY_UNHEALTHY)
                | (lib.OMNI_POLICY_DRAINING if self.draining else 0))


@dataclass
class QueueItem:
    arrival_us: int
    work_us: int = 0


def _prefill_array(cands):
    arr = ffi.new("omni_prefill_cand_t[]", max(len(cands), 1))
    for i, c in enumerate(cands):
        a = arr[i]
        a.inst = c.inst
        a.flags = c._flags()
        a.cached_tokens = c.cached_tokens
        a.running = c.running
        a.max_running = c.max_running
        a.inflight_tokens = c.inflight_tokens
        a.max_tokens = c.max_tokens
        a.wait_us = c.wait_us
        a.prefill_us = c.prefill_us
        a.step_start_us = c.step_start_us
        a.step_done_us = c.step_done_us
        a.step_service_us = c.step_service_us
    return arr


def _prefill_back(arr, cands):
    for i, c in enumerate(cands):
        a = arr[i]
        c.cached_tokens = a.cached_tokens
        c.wait_us = a.wait_us
        c.prefill_us = a.prefill_us
        c.max_tokens = a.max_tokens
        c.draining = bool(a.flags & lib.OMNI_POLICY_DRAINING)


def prepare_prefill(predictor, candidates, cached_blocks, block_size,
                    prompt_tokens, now_us):
    """Fill ``cached_tokens``, ``wait_us`` and ``prefill_us`` of the
    candidates from a match result (blocks per instance, as
    :meth:`PrefixIndex.match` returns) and the predictor.  Returns them."""
    arr = _prefill_array(candidates)
    cached = list(cached_blocks or ())
    blocks = ffi.new("uint32_t[]", cached) if cached else ffi.NULL
    check(lib.omni_policy_prefill_prepare(predictor._h, blocks, len(cached),
                                          block_size, prompt_tokens, now_us,
                                          arr, len(candidates)),
          "prepare_prefill")
    for i, c in enumerate(candidates):
        c.cached_tokens = arr[i].cached_tokens
        c.wait_us = arr[i].wait_us
        c.prefill_us = arr[i].prefill_us
    return candidates


def add_prefill_delay(candidates, waiting, arrival_gap_us=0.0):
    """Add to each candidate's ``prefill_us`` what that prefill costs the
    requests queued behind it (``waiting`` counts this one) and those that
    arrive while it runs (one every ``arrival_gap_us`` on average; 0:
    unknown).  Returns the candidates."""
    arr = _prefill_array(candidates)
    check(lib.omni_policy_prefill_add_delay(arr, len(candidates), waiting,
                                            float(arrival_gap_us)),
          "add_prefill_delay")
    for i, c in enumerate(candidates):
        c.prefill_us = arr[i].prefill_us
    return candidates


def choose_prefill(candidates, prompt_tokens, hold_slack_us=None):
    """Where to prefill: least predicted TTFT within limits, or hold.

    ``hold_slack_us`` None never holds on a prediction (only on limits).
    """
    arr = _prefill_array(candidates)
    out = ffi.new("omni_decision_t *")
    slack = MASK64 if hold_slack_us is None else hold_slack_us
    rc = lib.omni_policy_prefill_choose(arr, len(candidates), prompt_tokens,
                                        slack, out)
    if rc != lib.OMNI_EHOLD:
        check(rc, "choose_prefill")
    return Decision._from_c(out)


def decide_prefill(predictor, candidates, cached_blocks, block_size,
                   prompt_tokens, now_us, hold_slack_us, waiting=1,
                   arrival_gap_us=0.0, force=False, deadline_us=0, front_us=0,
                   step_tokens=0, starved=False):
    """The module's decision for the start of a held request
    (``omni_policy_prefill_decide``): prepare, the step and batch-budget
    rules, the cost to the others, choose, and what to do when the best
    instance is busy past the slack.  The candidates are updated as the C
    function updates them.  ``Decision.reason`` "hold-busy": this one waits
    and one behind it may go; "hold-limits"/"hold-none"/"hold-full": nothing
    that needs a free instance can go now.  ``deadline_us``: its TTFT
    deadline (an SLO; 0: none), same clock as ``now_us``.  ``front_us``: the
    engine's own work on it before it can start (tokenizing a text prompt):
    it may be sent that much earlier than the slack alone allows.
    ``step_tokens``: the engines' prefill step budget (0: unknown); with it
    an instance over its batch budget may take the request during the last
    step of its work (omni_policy.h), unless it is ``starved`` (it goes
    first for having waited past the starvation bound; its cost to the
    others, ``waiting`` and ``arrival_gap_us``, is then not weighed).  Over
    its budget, an instance whose work is predicted done while its answer is
    still more than the slack away (a KV transfer: parallel P/D) may take
    any request."""
    arr = _prefill_array(candidates)
    cached = list(cached_blocks or ())
    blocks = ffi.new("uint32_t[]", cached) if cached else ffi.NULL
    opts = ffi.new("omni_prefill_opts_t *", {
        "hold_slack_us": hold_slack_us, "arrival_gap_us": float(arrival_gap_us),
        "waiting": waiting, "force": int(bool(force)),
        "deadline_us": deadline_us, "front_us": front_us,
        "step_tokens": step_tokens, "starved": int(bool(starved))})
    out = ffi.new("omni_decision_t *")
    rc = lib.omni_policy_prefill_decide(predictor._h, blocks, len(cached),
                                        block_size, prompt_tokens, now_us, opts,
                                        arr, len(candidates), out)
    if rc != lib.OMNI_EHOLD:
        check(rc, "decide_prefill")
    _prefill_back(arr, candidates)
    return Decision._from_c(out)


def _job_array(jobs):
    arr = ffi.new("omni_decode_job_t[]", max(len(jobs), 1))
    for i, j in enumerate(jobs):
        arr[i].prompt_tokens = j.prompt_tokens
        arr[i].output_tokens = j.output_tokens
        arr[i].arrival_us = j.arrival_us
    return arr


def _decode_array(insts):
    arr = ffi.new("omni_decode_inst_t[]", max(len(insts), 1))
    for i, d in enumerate(insts):
        arr[i].inst = d.inst
        arr[i].flags = d._flags()
        arr[i].running = d.running
        arr[i].max_running = d.max_running
        arr[i].load_tokens = d.load_tokens
        arr[i].max_tokens = d.max_tokens
    return arr


def place_decode(instances, job):
    """The least-loaded decode instance within its limits, or hold."""
    arr = _decode_array(instances)
    out = ffi.new("omni_decision_t *")
    rc = lib.omni_policy_decode_place(arr, len(instances), _job_array([job]),
                                      out)
    if rc != lib.OMNI_EHOLD:
        check(rc, "place_decode")
    return Decision._from_c(out)


def place_decode_tpot(instances, job, step_us, tpot_us):
    """:func:`place_decode` with a TPOT target: the least loaded of the
    instances whose predicted step with this job (``step_us``, one per
    instance) meets ``tpot_us``; if none does, :func:`place_decode`'s
    choice.  ``tpot_us`` 0: :func:`place_decode`."""
    arr = _decode_array(instances)
    steps = list(step_us)
    if len(steps) != len(instances):
        raise ValueError("step_us needs one value per instance")
    out = ffi.new("omni_decision_t *")
    rc = lib.omni_policy_decode_place_tpot(arr, len(instances), _job_array([job]),
                                           ffi.new("uint64_t[]", steps or [0]),
                                           tpot_us, out)
    if rc != lib.OMNI_EHOLD:
        check(rc, "place_decode_tpot")
    return Decision._from_c(out)


_ORDERS = {"fcfs": lib.OMNI_QUEUE_FCFS, "sjf": lib.OMNI_QUEUE_SJF,
           "lpt": lib.OMNI_QUEUE_LPT}


def _queue_opts(order, aging, starvation_us, backlog_us=0):
    if order not in _ORDERS:
        raise ValueError(f"queue order must be 'fcfs', 'sjf' or 'lpt', not {order!r}")
    return ffi.new("omni_queue_opts_t *", {
        "order": _ORDERS[order], "aging": aging, "starvation_us": starvation_us,
        "backlog_us": backlog_us,
    })


def _queue_items(items):
    arr = ffi.new("omni_queue_item_t[]", max(len(items), 1))
    for i, q in enumerate(items):
        arr[i].arrival_us = q.arrival_us
        arr[i].work_us = q.work_us
    return arr


def queue_work(predictor, cached_blocks, block_size, instances, prompt_tokens,
               starve=False):
    """SJF work of a prompt: the predicted prefill, on the instance (of
    ``instances``, predictor numbers) that holds most of it, of the tokens
    it does not hold.  With ``starve``, (work, the part of it the
    starvation rule counts: 0 until that instance's model has fitted
    OMNI_POLICY_STARVE_SAMPLES prefills)."""
    cached = list(cached_blocks or ())
    blocks = ffi.new("uint32_t[]", cached) if cached else ffi.NULL
    inst = ffi.new("uint32_t[]", list(instances) or [0])
    out = ffi.new("uint64_t *")
    starve_out = ffi.new("uint64_t *")
    check(lib.omni_policy_queue_work(predictor._h, blocks, len(cached), block_size,
                                     inst, len(instances), prompt_tokens, out,
                                     starve_out),
          "queue_work")
    return (out[0], starve_out[0]) if starve else out[0]


def queue_key(arrival_us, work, order="sjf", aging=1.0):
    """The static key of a queued request (lower goes first; equal keys:
    queued earlier first)."""
    return lib.omni_policy_queue_key(_queue_opts(order, aging, 0), arrival_us, work)


def queue_next(late, now_us, order="sjf", aging=1.0, starvation_us=0, head=None,
               backlog_us=0):
    """``late``: the starved items among the oldest, in queue order;
    ``head``: the item with the least key (None: not known).  The index of
    the one to release, or None to release the least key (nothing starved,
    or a head short enough to go first)."""
    opts = _queue_opts(order, aging, starvation_us, backlog_us)
    h = _queue_items([head]) if head is not None else ffi.NULL
    rc = lib.omni_policy_queue_next(opts, _queue_items(late), len(late), h, now_us)
    if rc == lib.OMNI_ENOTFOUND:
        return None
    return check(rc, "queue_next")


def queue_order(items, now_us, order="sjf", aging=1.0, starvation_us=0, backlog_us=0):
    """Indices of a queue's items (in queue order) in release order: what
    repeated picks at ``now_us`` give (``backlog_us``: the queue's work per
    instance, which the starvation bound follows; the module passes it)."""
    opts = _queue_opts(order, aging, starvation_us, backlog_us)
    out = _new_raw("uint32_t[]", max(len(items), 1))
    check(lib.omni_policy_queue_order(_queue_items(items), len(items), now_us,
                                      opts, out), "queue_order")
    return list(out[0:len(items)])


def queue_pick(items, now_us, order="sjf", aging=1.0, starvation_us=0, backlog_us=0):
    """The index of the item (of a queue, in queue order) that the module
    releases next, or None for an empty queue."""
    opts = _queue_opts(order, aging, starvation_us, backlog_us)
    if not items:
        return None
    return check(lib.omni_policy_queue_pick(_queue_items(items), len(items), now_us,
                                            opts), "queue_pick")


@dataclass
class SloItem:
    """A queued request for the SLO functions: ``deadline_us`` is its
    arrival plus its TTFT SLO (0: none); ``seq`` its place in the queue
    (None: its index in the list given)."""

    arrival_us: int
    work_us: int = 0
    deadline_us: int = 0
    seq: object = None


@dataclass(frozen=True)
class SloPick:
    """:func:`slo_next`'s answer: ``index`` into the list given, why
    (``reason``: "starved", "order", "plan", "lost"), how many could still
    meet their deadline and how many of those the plan keeps on time."""

    index: int
    reason: str
    feasible: int
    on_time: int


_SLO_REASONS = {lib.OMNI_SLO_STARVED: "starved", lib.OMNI_SLO_ORDER: "order",
                lib.OMNI_SLO_PLAN: "plan", lib.OMNI_SLO_LOST: "lost"}


def _slo_items(items):
    arr = ffi.new("omni_slo_item_t[]", max(len(items), 1))
    for i, q in enumerate(items):
        arr[i].arrival_us = q.arrival_us
        arr[i].work_us = q.work_us
        arr[i].deadline_us = q.deadline_us
        arr[i].seq = i if q.seq is None else q.seq
    return arr


def _waits(wait_us):
    waits = list(wait_us)
    return ffi.new("uint64_t[]", waits or [0]), len(waits)


def slo_starved(item, now_us, order="sjf", aging=1.0, starvation_us=0):
    """Whether a queued request is past the starvation timeout, counted
    from its deadline when it has one."""
    return bool(lib.omni_policy_slo_starved(
        _queue_opts(order, aging, starvation_us), _slo_items([item]), now_us))


def slo_next(items, wait_us, now_us, order="sjf", aging=1.0, starvation_us=0):
    """The SLO-aware release (``omni_policy_slo_next``): which of the queued
    ``items`` to release next, given each usable instance's predicted time
    until it is free (``wait_us``).  None for an empty queue."""
    if not items:
        return None
    opts = _queue_opts(order, aging, starvation_us)
    waits, m = _waits(wait_us)
    size = lib.omni_policy_slo_scratch_size(len(items), m)
    scratch = _new_raw("uint64_t[]", size // 8 + 1)
    out = ffi.new("omni_slo_pick_t *")
    check(lib.omni_policy_slo_next(opts, _slo_items(items), len(items), waits, m,
                                   now_us, scratch, size, out), "slo_next")
    return SloPick(index=out.index, reason=_SLO_REASONS[out.reason],
                   feasible=out.feasible, on_time=out.on_time)


def retry_after(wait_us, queued_work_us, slack_us=0):
    """Retry-After seconds for a refused request: when the instances (each
    free after ``wait_us``) would have done the queued work between them,
    less ``slack_us``; 1 to OMNI_POLICY_RETRY_MAX_S."""
    waits, m = _waits(wait_us)
    out = ffi.new("uint32_t *")
    check(lib.omni_policy_retry_after(waits, m, queued_work_us, slack_us, out),
          "retry_after")
    return out[0]


def slo_admit(request, items, wait_us, now_us, queued_work_us=None):
    """The early 429 (``omni_policy_slo_admit``): None to admit the arriving
    ``request`` (an :class:`SloItem` with a deadline), else the Retry-After
    seconds.  ``queued_work_us`` defaults to the items' total work."""
    waits, m = _waits(wait_us)
    if queued_work_us is None:
        queued_work_us = sum(q.work_us for q in items)
    out = ffi.new("uint32_t *")
    rc = check(lib.omni_policy_slo_admit(_slo_items([request]), _slo_items(items),
                                         len(items), waits, m, now_us,
                                         queued_work_us, out), "slo_admit")
    return out[0] if rc == 1 else None


class Arrivals:
    """The mean gap between arrivals, as the module keeps it
    (``omni_policy_arrived``)."""

    def __init__(self):
        self._a = ffi.new("omni_arrivals_t *")

    def arrived(self, now_us):
        lib.omni_policy_arrived(self._a, now_us)
        return self

    @property
    def gap_us(self):
        return self._a.gap_us

    @property
    def last_us(self):
        return self._a.last_us


@dataclass
class PickCandidate:
    """One instance for :func:`pick_now`."""

    running: int = 0
    load_tokens: int = 0
    matched: int = 0              # prefix blocks held (cache-aware)
    healthy: bool = True
    tried: bool = False


_PICKS = {"round-robin": lib.OMNI_PICK_ROUND_ROBIN,
          "least-loaded": lib.OMNI_PICK_LEAST_LOADED,
          "cache-aware": lib.OMNI_PICK_CACHE_AWARE}


def pick_now(candidates, policy, start=0):
    """The at-once choice (index), or None when every candidate is
    unhealthy or tried."""
    if policy not in _PICKS:
        raise ValueError(f"policy must be one of {sorted(_PICKS)}, not {policy!r}")
    arr = ffi.new("omni_pick_cand_t[]", max(len(candidates), 1))
    for i, c in enumerate(candidates):
        arr[i].flags = ((0 if c.healthy else lib.OMNI_POLICY_UNHEALTHY)
                        | (lib.OMNI_POLICY_TRIED if c.tried else 0))
        arr[i].running = c.running
        arr[i].load_tokens = c.load_tokens
        arr[i].matched = c.matched
    rc = lib.omni_policy_pick_now(arr, len(candidates), _PICKS[policy], start)
    if rc == lib.OMNI_ENOTFOUND:
        return None
    return check(rc, "pick_now")
