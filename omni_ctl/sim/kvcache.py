"""Paged KV cache with an automatic prefix cache (vLLM-style).

Blocks hold `block_size` tokens. A full block that holds computed tokens gets a
chained hash (its parent's hash + its token ids) and is registered in the
prefix cache. Freed blocks go to the tail of an LRU free queue; allocation takes
blocks from the head and evicts whatever cached content they still had. Cached
blocks with no reference stay reusable until evicted.

Cache changes are recorded in `events` (consumed by the engine after each step):
("stored", [hashes], parent_hash_or_None, [token ids]), ("removed", [hashes]),
("cleared",).
"""

import hashlib
from array import array
from collections import OrderedDict


def prompt_block_hashes(tokens, block_size, salt, parent=None, start=0):
    """Chained 64-bit hashes of the full blocks of `tokens` from block `start`.

    Low 64 bits of SHA-256(salt, parent hash, token ids as uint32): the same
    shape as vLLM's default, and nothing the proxy can (or should) recompute.
    """
    buf = array("I", tokens).tobytes()
    width = 4 * block_size
    out = []
    for i in range(start, len(tokens) // block_size):
        h = hashlib.sha256(salt)
        h.update((parent or 0).to_bytes(8, "big"))
        h.update(buf[i * width:(i + 1) * width])
        parent = int.from_bytes(h.digest()[-8:], "big")
        out.append(parent)
    return out


class BlockPool:
    def __init__(self, num_blocks, block_size):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.block_hash = [None] * num_blocks
        self.cached = {}                    # hash -> block id
        self.free = OrderedDict.fromkeys(range(num_blocks))
        self.events = []

    # -- queries -------------------------------------------------------
    def num_free(self):
        return len(self.free)

    def usage(self):
        return 1.0 - len(self.free) / self.num_blocks

    def match_prefix(self, hashes):
        """Block ids of the longest cached prefix of `hashes`."""
        out = []
        cached = self.cached
        for h in hashes:
            b = cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def free_among(self, block_ids):
        ref = self.ref
        return sum(1 for b in block_ids if ref[b] == 0)

    # -- changes -------------------------------------------------------
    def touch(self, block_ids):
        """Take a reference on cached blocks (removing them from the free queue)."""
        ref, free = self.ref, self.free
        for b in block_ids:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n):
        """n fresh blocks, or None when fewer than n are free."""
        if n > len(self.free):
            return None
        out = []
        removed = []
        free, ref, bh, cached = self.free, self.ref, self.block_hash, self.cached
        for _ in range(n):
            b, _ = free.popitem(last=False)
            h = bh[b]
            if h is not None:
                bh[b] = None
                if cached.get(h) == b:
                    del cached[h]
                    removed.append(h)
            ref[b] = 1
            out.append(b)
        if removed:
            self.events.append(("removed", removed))
        return out

    def release(self, block_ids):
        """Drop one reference; blocks reaching zero join the free queue tail.

        Reversed, so a request's last blocks are evicted before its first
        (a shared prefix outlives the suffixes that hang off it)."""
        ref, free = self.ref, self.free
        for b in reversed(block_ids):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None

    def register(self, block_id, h):
        """Put a full computed block in the prefix cache; False if a different
        block already holds the same content (this one stays private)."""
        if h in self.cached:
            return False
        self.cached[h] = block_id
        self.block_hash[block_id] = h
        return True

    def reset(self):
        """Forget every cached hash (vLLM's reset_prefix_cache)."""
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        self.events.append(("cleared",))

    def take_events(self):
        ev, self.events = self.events, []
        return ev

    def check_integrity(self):
        """Recount everything from scratch; raise AssertionError on drift."""
        free = set(self.free)
        for b in range(self.num_blocks):
            assert self.ref[b] >= 0, b
            assert (self.ref[b] == 0) == (b in free), b
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, (h, b)
        hashed = sum(1 for h in self.block_hash if h is not None)
        assert hashed == len(self.cached), (hashed, len(self.cached))
