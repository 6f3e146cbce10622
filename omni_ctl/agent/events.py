"""Decoding of the engines' KV-event payloads (PROTOCOLS.md section 4).

A payload is msgpack `[ts, [event, ...], data_parallel_rank]`; events come in
the array form (`["BlockStored", hashes, parent, token_ids, block_size,
lora_id, medium, ...]`) or the map form (`{"type": "BlockStored", ...}`).
:func:`decode_payload` returns normalized events:

    ("stored", [key, ...], parent_key_or_None, [token, ...], block_size)
    ("removed", [key, ...])
    ("cleared",)

Keys are the engine hashes as the index's 64-bit keys (ints modulo 2**64,
raw bytes hashed: :func:`omni_ctl.scoring.engine_key`).  Skipped, and
counted in the caller's dict `skipped` under a reason: unknown event types,
unknown fields (ignored), placeholder stores (block_size 0 or no tokens),
groups other than the main one (group_idx != 0), media other than GPU,
LoRA stores (their blocks must not match base-model prompts), and stores
whose token count is not blocks x block_size.  A payload that is not a
batch at all raises :class:`EventDecodeError`.
"""

import msgpack

from ..scoring import engine_key

_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids",
                  "block_size", "lora_id", "medium")
_REMOVED_FIELDS = ("block_hashes", "medium")


class EventDecodeError(ValueError):
    pass


def _skip(skipped, why):
    skipped[why] = skipped.get(why, 0) + 1


def _key(h):
    if isinstance(h, bool) or not isinstance(h, (int, bytes)):
        raise EventDecodeError(f"block hash of type {type(h).__name__}")
    return engine_key(h)


def _fields(ev, names):
    """Array or map event -> (type name, dict of the known fields)."""
    if isinstance(ev, (list, tuple)):
        if not ev or not isinstance(ev[0], str):
            raise EventDecodeError("array event without a type tag")
        return ev[0], dict(zip(names, ev[1:]))
    if isinstance(ev, dict):
        kind = ev.get("type")
        if not isinstance(kind, str):
            raise EventDecodeError("map event without a string 'type'")
        return kind, ev
    raise EventDecodeError(f"event of type {type(ev).__name__}")


def _medium_ok(f, skipped):
    medium = f.get("medium")
    if medium is not None and medium != "GPU":
        _skip(skipped, "medium")
        return False
    group = f.get("group_idx")
    if group not in (None, 0):
        _skip(skipped, "group")
        return False
    return True


def _event(ev, skipped):
    tag = ev[0] if isinstance(ev, (list, tuple)) and ev else None
    names = _REMOVED_FIELDS if tag == "BlockRemoved" else _STORED_FIELDS
    kind, f = _fields(ev, names)
    if kind == "BlockStored":
        if not _medium_ok(f, skipped):
            return None
        bs, tokens, hashes = f.get("block_size"), f.get("token_ids"), f.get("block_hashes")
        if not bs or not tokens:
            _skip(skipped, "placeholder")
            return None
        if f.get("lora_id") is not None or f.get("lora_name") is not None:
            _skip(skipped, "lora")
            return None
        if (not isinstance(bs, int) or isinstance(bs, bool)
                or not isinstance(tokens, (list, tuple))
                or not isinstance(hashes, (list, tuple)) or not hashes
                or len(tokens) != len(hashes) * bs):
            _skip(skipped, "malformed_store")
            return None
        if not all(isinstance(t, int) and not isinstance(t, bool)
                   and 0 <= t < 2**32 for t in tokens):
            _skip(skipped, "malformed_store")
            return None
        parent = f.get("parent_block_hash")
        return ("stored", [_key(h) for h in hashes],
                None if parent is None else _key(parent), list(tokens), bs)
    if kind == "BlockRemoved":
        if not _medium_ok(f, skipped):
            return None
        hashes = f.get("block_hashes")
        if not isinstance(hashes, (list, tuple)):
            _skip(skipped, "malformed_remove")
            return None
        return ("removed", [_key(h) for h in hashes])
    if kind == "AllBlocksCleared":
        if not _medium_ok(f, skipped):
            return None
        return ("cleared",)
    _skip(skipped, "unknown_type")
    return None


def decode_payload(payload, skipped=None):
    """(timestamp, [normalized event], data_parallel_rank) of one message."""
    skipped = {} if skipped is None else skipped
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, TypeError) as exc:
        raise EventDecodeError(f"not msgpack: {exc}") from None
    if isinstance(batch, dict):
        ts, events, rank = (batch.get("ts"), batch.get("events"),
                            batch.get("data_parallel_rank"))
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        ts, events = batch[0], batch[1]
        rank = batch[2] if len(batch) > 2 else None
    else:
        raise EventDecodeError("payload is not [ts, events, rank]")
    if not isinstance(events, (list, tuple)):
        raise EventDecodeError("events is not a list")
    out = []
    for ev in events:
        try:
            e = _event(ev, skipped)
        except EventDecodeError:
            _skip(skipped, "malformed")
            continue
        if e is not None:
            out.append(e)
    return ts, out, rank
