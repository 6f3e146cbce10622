"""Per-instance engine chains, to cut stores for an index whose block size B
is a multiple of the engine's E (omni_ingest.h: "lead" and "anchor").

Only needed when B > E: then a store may begin inside an index block, and the
tokens of its ancestors since the last index boundary must travel with it.
Each engine block is remembered with its parent, depth (blocks from the
prompt's start) and tokens until the engine removes it.
"""


class Chains:
    def __init__(self, index_block_size):
        self.b = index_block_size
        self.blocks = {}        # key -> (parent key or None, depth, tokens)

    def needed(self, e):
        return self.b > e

    def stored(self, keys, parent, tokens, e):
        """Record a store; returns (anchor, lead tokens) for its record, or
        None when its ancestors are unknown (the store cannot be placed)."""
        if parent is None:
            depth = 0
        else:
            got = self.blocks.get(parent)
            if got is None:
                return None
            depth = got[1]
        lead_blocks = (depth * e % self.b) // e
        lead = []
        anchor = parent
        for _ in range(lead_blocks):
            got = self.blocks.get(anchor)
            if got is None:
                return None
            lead[:0] = got[2]
            anchor = got[0]
        p = parent
        for i, k in enumerate(keys):
            self.blocks[k] = (p, depth + i + 1, tuple(tokens[i * e:(i + 1) * e]))
            p = k
        return anchor, lead

    def removed(self, keys):
        for k in keys:
            self.blocks.pop(k, None)

    def clear(self):
        self.blocks.clear()
