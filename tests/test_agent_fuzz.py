"""The agent's msgpack event decoding under random and mutated payloads:
it returns events or raises EventDecodeError, nothing else, and what it
returns is well formed (so the batch encoder accepts it)."""

import time

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_ctl.agent.batch import Batch
from omni_ctl.agent.events import EventDecodeError, decode_payload
from omni_ctl.sim.kvevents import encode_event

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

SEEDS = [msgpack.packb([time.time(), [
    encode_event(("stored", [1, 2**64 - 1], None, list(range(32))), enc, 16),
    encode_event(("stored", [3], 2, list(range(16))), enc, 16),
    encode_event(("removed", [1, b"\x01\x02"]), enc, 16),
    encode_event(("cleared",), enc, 16)], 0], use_bin_type=True)
    for enc in ("array", "map")]


def check(payload):
    skipped = {}
    try:
        _, events, _ = decode_payload(payload, skipped)
    except EventDecodeError:
        return None
    b = Batch(16)
    for ev in events:
        if ev[0] == "stored":
            _, keys, parent, tokens, bs = ev
            assert len(tokens) == len(keys) * bs and bs > 0
            assert all(0 <= k < 2**64 for k in keys)
            b.store("h:1", bs, keys, tokens, parent)
        elif ev[0] == "removed":
            b.remove("h:1", 16, ev[1])
        else:
            assert ev == ("cleared",)
            b.clear("h:1")
    b.encode()
    return events


def test_seeds_decode():
    for s in SEEDS:
        ev = check(s)
        assert [e[0] for e in ev] == ["stored", "stored", "removed", "cleared"]


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data):
    check(data)


leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                 st.text(max_size=12), st.binary(max_size=12),
                 st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared",
                                  "GPU", "CPU", "block_hashes", "token_ids"]))
tree = st.recursive(leaf, lambda c: st.one_of(
    st.lists(c, max_size=6),
    st.dictionaries(st.sampled_from(["type", "block_hashes", "parent_block_hash",
                                     "token_ids", "block_size", "medium", "group_idx",
                                     "lora_id", "x"]), c, max_size=6)), max_leaves=30)


@FUZZ
@given(tree)
def test_random_msgpack_structures(obj):
    check(msgpack.packb([0.0, obj if isinstance(obj, list) else [obj], None],
                        use_bin_type=True))
    check(msgpack.packb(obj, use_bin_type=True))


@FUZZ
@given(st.integers(0, 1), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                   min_size=1, max_size=5), st.integers(-6, 0))
def test_mutated_payloads(which, flips, cut):
    buf = bytearray(SEEDS[which])
    for pos, val in flips:
        buf[pos % len(buf)] = val
    check(bytes(buf[:len(buf) + cut] if cut else buf))
