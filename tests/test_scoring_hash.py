"""Chained block hashes (omni_hash.h) through the Python layer."""

import array
import struct

import pytest

from omni_ctl.scoring import (MASK64, block_hashes, block_hashes_from,
                              engine_key, hash_root, text_block_hashes)
from omni_ctl.scoring.errors import InvalidArgumentError

TOKENS = list(range(64))

# The definition is part of the wire between the nginx module, the tokenizer
# service and saved state: pinned here so a change is deliberate.
GOLDEN_SEED0 = [0xb46264e687addc66, 0xcae3547bd48c537c,
                0x9ddd7f62bcaaead1, 0x739bfb2b1ecc74c1]
GOLDEN_SEED7 = [0xb3c0993277ac816f, 0xaa5979956b354dce,
                0xf519378247b7ffce, 0xc23388348d848078]


def test_golden_values():
    assert block_hashes(TOKENS, 16) == GOLDEN_SEED0
    assert block_hashes(TOKENS, 16, seed=7) == GOLDEN_SEED7
    assert hash_root(0) == 0xc00ab19454069a43


def test_definition_against_independent_xxhash():
    """hash[k] = XXH3_64(LE tokens of block k, seed=hash[k-1]), checked with
    the python-xxhash package (a separate implementation)."""
    xxhash = pytest.importorskip("xxhash")
    root = xxhash.xxh3_64_intdigest(b"omni-proxy/block-chain/v1", seed=0) or 1
    assert hash_root(0) == root
    h, want = root, []
    for k in range(4):
        block = struct.pack("<16I", *TOKENS[16 * k:16 * (k + 1)])
        h = xxhash.xxh3_64_intdigest(block, seed=h) or 1
        want.append(h)
    assert block_hashes(TOKENS, 16) == want


def test_long_blocks_against_independent_xxhash():
    """Blocks longer than 240 bytes take XXH3's vector path (the library
    calls libxxhash's run-time dispatcher: SSE2, AVX2 or AVX-512): the
    values must be the definition's, for token blocks and text blocks of the
    default size (256 tokens, 1 KB) and an odd one."""
    xxhash = pytest.importorskip("xxhash")
    tokens = [(i * 2654435761) & 0xFFFFFFFF for i in range(3 * 256 + 77)]
    for bs in (256, 61, 1000):
        h, want = hash_root(0), []
        for k in range(len(tokens) // bs):
            block = struct.pack(f"<{bs}I", *tokens[bs * k:bs * (k + 1)])
            h = xxhash.xxh3_64_intdigest(block, seed=h) or 1
            want.append(h)
        assert block_hashes(tokens, bs) == want
        text = struct.pack(f"<{len(tokens)}I", *tokens)
        assert text_block_hashes(text, bs) == want


def test_only_full_blocks_and_prefix_stability():
    assert block_hashes(TOKENS[:15], 16) == []
    assert block_hashes([], 16) == []
    full = block_hashes(TOKENS, 16)
    assert block_hashes(TOKENS[:40], 16) == full[:2]
    # the same prefix under a longer prompt hashes the same
    assert block_hashes(TOKENS + [999] * 20, 16)[:4] == full


def test_chaining_a_change_propagates_forward_only():
    changed = list(TOKENS)
    changed[20] = 7777          # block 1
    a, b = block_hashes(TOKENS, 16), block_hashes(changed, 16)
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:]))


def test_same_block_content_differs_by_position():
    # equal token blocks at different depths: different chained hashes
    h = block_hashes([5] * 64, 16)
    assert len(set(h)) == 4


def test_seed_is_a_namespace():
    assert set(block_hashes(TOKENS, 16, seed=1)).isdisjoint(
        block_hashes(TOKENS, 16, seed=2))
    assert block_hashes(TOKENS, 16, seed=-1) == block_hashes(TOKENS, 16,
                                                             seed=MASK64)


def test_hashes_from_parent_continue_the_chain():
    full = block_hashes(TOKENS, 16)
    assert block_hashes_from(full[1], TOKENS[32:], 16) == full[2:]
    assert block_hashes_from(hash_root(0), TOKENS, 16) == full


def test_any_uint32_token_ids_no_vocabulary_assumed():
    toks = [0, 2**32 - 1, 2**31, 123456789] * 8
    assert len(block_hashes(toks, 8)) == 4
    with pytest.raises(ValueError):
        block_hashes([2**32] * 8, 8)
    with pytest.raises(ValueError):
        block_hashes([-1] * 8, 8)


def test_buffer_input_same_as_list():
    arr = array.array("I", TOKENS)
    assert block_hashes(arr, 16) == block_hashes(TOKENS, 16)
    with pytest.raises(TypeError):
        block_hashes(b"abcd", 1)


def test_bad_block_size():
    with pytest.raises(InvalidArgumentError):
        block_hashes(TOKENS, 0)
    with pytest.raises(ValueError):            # the builtin, too
        block_hashes(TOKENS, 70000)


def test_text_blocks_are_pseudo_token_blocks():
    text = b"The quick brown fox jumps over the lazy dog!!!!"
    pseudo = list(struct.unpack(f"<{len(text) // 4}I",
                                text[:len(text) // 4 * 4]))
    assert text_block_hashes(text, 4) == block_hashes(pseudo, 4)
    assert text_block_hashes(text, 4) == [0x7b05490c9bd68567,
                                          0xa072080d86b3fd1d]
    # str is UTF-8; trailing bytes that do not fill a block are ignored
    assert text_block_hashes("The quick brown fox jumps over the lazy dog"
                             "!!!!", 4) == text_block_hashes(text, 4)
    assert text_block_hashes(text[:31], 4) == text_block_hashes(text, 4)[:1]


def test_engine_keys():
    assert engine_key(5) == 5
    assert engine_key(-1) == MASK64            # signed and unsigned agree
    assert engine_key(2**64 + 3) == 3
    k = engine_key(b"\x01" * 32)
    assert 0 <= k <= MASK64 and k == engine_key(bytearray(b"\x01" * 32))
    assert engine_key(b"\x01" * 32) != engine_key(b"\x02" * 32)
    with pytest.raises(TypeError):
        engine_key("abc")
