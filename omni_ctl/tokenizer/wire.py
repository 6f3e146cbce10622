"""The tokenizer service's binary answer (docs/tokenizer.md, "Answer").

All integers little-endian:

    offset  size  field
    0       4     magic  b"OMTK"
    4       2     version (1)
    6       2     flags (FLAG_*)
    8       4     count: number of prompts that follow (0 with FLAG_IDS_GIVEN)
    12      4     reused: tokens taken from the reuse cache (informational)
    16      4*count          lengths, one uint32 per prompt
    16+4*count  4*sum(lengths)  ids, uint32, the prompts one after the other

    (then, with FLAG_HANDLE only)
    8             handle, uint64: names the rendered conversation for answer
                  learning (LEARN below)

The body is exactly 16 + 4*count + 4*sum(lengths) bytes long, plus 8 with
FLAG_HANDLE.

The learn datagram (the proxy -> the worker that gave the handle, on that
worker's unix SOCK_DGRAM socket LEARN_SOCKET.<handle >> 48>):

    0       4     magic  b"OMLN"
    4       2     version (1)
    6       2     reserved (0)
    8       8     handle, uint64
    16      ...   the engine's answer text, UTF-8 (the rest of the datagram)
"""

from __future__ import annotations

import struct
import sys
from array import array

MAGIC = b"OMTK"
VERSION = 1
HEADER = struct.Struct("<4sHHII")
CONTENT_TYPE = "application/x-omni-tokens"

# the request's prompt is already token ids: nothing was tokenized, count is 0
FLAG_IDS_GIVEN = 0x1
# the ids are a rendered chat conversation
FLAG_CHAT = 0x2
# chat only: the ids are what SGLang renders for this request (a plain
# conversation: the list of what disqualifies one is in docs/tokenizer.md),
# so they may be forwarded as `input_ids`
FLAG_SGLANG_SAFE = 0x4
# part of the ids came from the multi-turn reuse cache
FLAG_REUSED = 0x8
# an 8-byte learn handle follows the ids
FLAG_HANDLE = 0x10

LEARN_MAGIC = b"OMLN"
LEARN_HEADER = struct.Struct("<4sHHQ")
HANDLE = struct.Struct("<Q")


class WireError(ValueError):
    """A body that is not a well-formed answer."""


def _u32(ids) -> bytes:
    a = ids if isinstance(ids, array) and ids.typecode == "I" else array("I", ids)
    if sys.byteorder != "little":
        a = array("I", a)
        a.byteswap()
    return a.tobytes()


def encode(prompts, flags: int = 0, reused: int = 0, handle: int | None = None) -> bytes:
    """The answer for a list of id sequences (a learn handle: FLAG_HANDLE)."""
    if handle is not None:
        flags |= FLAG_HANDLE
    head = HEADER.pack(MAGIC, VERSION, flags, len(prompts), reused)
    lengths = _u32([len(p) for p in prompts])
    tail = [HANDLE.pack(handle)] if handle is not None else []
    return b"".join([head, lengths] + [_u32(p) for p in prompts] + tail)


def handle_of(body: bytes) -> int | None:
    """The learn handle of a well-formed answer, None without one."""
    flags = HEADER.unpack_from(body)[2]
    return HANDLE.unpack_from(body, len(body) - 8)[0] if flags & FLAG_HANDLE else None


def learn_message(handle: int, answer: str) -> bytes:
    """The learn datagram for a handle and the engine's answer."""
    return LEARN_HEADER.pack(LEARN_MAGIC, VERSION, 0, handle) + answer.encode("utf-8")


def learn_decode(data: bytes) -> tuple[int, str]:
    """(handle, answer) of a learn datagram; WireError when malformed."""
    if len(data) < LEARN_HEADER.size:
        raise WireError(f"learn datagram too short ({len(data)} bytes)")
    magic, version, _, handle = LEARN_HEADER.unpack_from(data)
    if magic != LEARN_MAGIC or version != VERSION:
        raise WireError(f"bad learn datagram header {data[:8]!r}")
    try:
        return handle, data[LEARN_HEADER.size:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"learn answer is not UTF-8: {exc}") from None


def decode(body: bytes) -> tuple[int, int, list[list[int]]]:
    """(flags, reused, prompts) of an answer; WireError when malformed."""
    if len(body) >= HEADER.size and HEADER.unpack_from(body)[2] & FLAG_HANDLE:
        body = body[:-8]
    if len(body) < HEADER.size:
        raise WireError(f"answer too short ({len(body)} bytes)")
    magic, version, flags, count, reused = HEADER.unpack_from(body)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}")
    if version != VERSION:
        raise WireError(f"unsupported version {version}")
    off = HEADER.size
    if len(body) < off + 4 * count:
        raise WireError("answer shorter than its lengths table")
    lengths = array("I", body[off:off + 4 * count])
    if sys.byteorder != "little":
        lengths.byteswap()
    if len(body) != off + 4 * count + 4 * sum(lengths):
        raise WireError(f"answer length {len(body)} does not match its lengths")
    ids = array("I", body[off + 4 * count:])
    if sys.byteorder != "little":
        ids.byteswap()
    out, pos = [], 0
    for n in lengths:
        out.append(ids[pos:pos + n].tolist())
        pos += n
    return flags, reused, out
