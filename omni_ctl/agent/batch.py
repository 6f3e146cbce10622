"""The agent's batch format (encoder); the decoder is omni_ingest.c.

See nginx_modules/scoring/omni_ingest.h for the layout.  A batch names its
instances ("host:port") in a table and holds records: STORE (engine block
hashes and their token ids, plus the lead that aligns them to the index's
block size), REMOVE, CLEAR, STATE (precise/approximate, health) and METRICS.
"""

import struct

from ..scoring import engine_key

MAGIC = 0x424E4D4F            # "OMNB"
VERSION = 1
HEADER = struct.Struct("<IHHIIHHI")

STORE, REMOVE, CLEAR, STATE, METRICS = 1, 2, 3, 4, 5
HAS_ANCHOR = 1

PRECISE, APPROX = 1, 2
HEALTH = {"unknown": 0, "up": 1, "down": 2}
MODES = {"precise": PRECISE, "approx": APPROX}

M_LOAD, M_USAGE, M_CAPACITY = 1, 2, 4

_REC = struct.Struct("<BBHI")


class BatchError(ValueError):
    pass


class Batch:
    """Records for one POST.  ``block_size``: the index block size the stores'
    leads are cut for (0 when no store has a lead)."""

    def __init__(self, block_size=0):
        self.block_size = block_size
        self.names = {}
        self.records = []           # (kind, name, fields) for sinks and tests
        self._parts = []
        self.nbytes = HEADER.size

    def __len__(self):
        return len(self.records)

    def _name(self, name):
        k = self.names.get(name)
        if k is None:
            raw = name.encode()
            if not 1 <= len(raw) <= 255:
                raise BatchError(f"instance name {name!r}: 1..255 bytes")
            if len(self.names) >= 1024:
                raise BatchError("more than 1024 instances in one batch")
            k = self.names[name] = len(self.names)
            self.nbytes += 2 + len(raw)
        return k

    def _add(self, kind, flags, name, body, fields):
        self._parts.append(_REC.pack(kind, flags, self._name(name), len(body))
                           + body)
        self.nbytes += _REC.size + len(body)
        self.records.append((kind, name, fields))

    def store(self, name, engine_block_size, hashes, tokens, anchor=None,
              lead=()):
        """Engine blocks ``hashes`` holding ``tokens`` (len(hashes) *
        engine_block_size), preceded in their prompt by ``lead`` (tokens
        since the last index-block boundary, which ends at engine block
        ``anchor``; None: the prompt's start)."""
        keys = [engine_key(h) for h in hashes]
        n, e = len(keys), engine_block_size
        if n == 0 or len(tokens) != n * e:
            raise BatchError(f"store: {len(tokens)} tokens for {n} blocks "
                             f"of {e}")
        if lead and self.block_size == 0:
            raise BatchError("store with a lead in a batch without block_size")
        body = b"".join((
            struct.pack("<IIIIQ", e, n, len(lead), 0,
                        0 if anchor is None else engine_key(anchor)),
            struct.pack(f"<{n}Q", *keys),
            struct.pack(f"<{len(lead)}I", *lead),
            struct.pack(f"<{len(tokens)}I", *tokens)))
        self._add(STORE, HAS_ANCHOR if anchor is not None else 0, name, body,
                  {"hashes": keys, "tokens": list(tokens), "lead": list(lead),
                   "anchor": anchor, "block_size": e})

    def remove(self, name, engine_block_size, hashes):
        keys = [engine_key(h) for h in hashes]
        body = struct.pack(f"<II{len(keys)}Q", engine_block_size, len(keys),
                           *keys)
        self._add(REMOVE, 0, name, body, {"hashes": keys,
                                          "block_size": engine_block_size})

    def clear(self, name):
        self._add(CLEAR, 0, name, b"", {})

    def state(self, name, mode, health="unknown"):
        body = struct.pack("<II", MODES[mode], HEALTH[health])
        self._add(STATE, 0, name, body, {"mode": mode, "health": health})

    def metrics(self, name, running=None, waiting=None, kv_usage=None,
                capacity_tokens=None):
        valid = 0
        if running is not None or waiting is not None:
            valid |= M_LOAD
        if kv_usage is not None:
            valid |= M_USAGE
        if capacity_tokens is not None:
            valid |= M_CAPACITY
        ppm = min(max(int(round((kv_usage or 0.0) * 1e6)), 0), 1000000)
        body = struct.pack("<IIIIQ", min(int(running or 0), 0xFFFFFFFF),
                           min(int(waiting or 0), 0xFFFFFFFF), ppm, valid,
                           int(capacity_tokens or 0))
        self._add(METRICS, 0, name, body, {
            "running": running, "waiting": waiting, "kv_usage": kv_usage,
            "capacity_tokens": capacity_tokens})

    def encode(self):
        names = b"".join(struct.pack("<H", len(n.encode())) + n.encode()
                         for n in self.names)
        body = names + b"".join(self._parts)
        return HEADER.pack(MAGIC, VERSION, HEADER.size,
                           HEADER.size + len(body), self.block_size,
                           len(self.names), 0, len(self.records)) + body


def split_batches(data):
    """Batches concatenated in a dump file (each carries its length)."""
    out, pos = [], 0
    while pos < len(data):
        if len(data) - pos < HEADER.size:
            raise BatchError(f"dump cut at byte {pos}")
        total = HEADER.unpack_from(data, pos)[3]
        if total < HEADER.size or pos + total > len(data):
            raise BatchError(f"dump: bad batch length {total} at byte {pos}")
        out.append(data[pos:pos + total])
        pos += total
    return out
