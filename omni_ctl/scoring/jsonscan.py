"""Pythonic layer over the scoring library's JSON scanner/splicer (omni_json.h).

The C side validates a whole document (RFC 8259, strict UTF-8) in one pass
and materialises only the members of the top-level object; edits are spliced
by copying spans of the input.  This module wraps that for Python callers and
tests.  Bodies are ``bytes``-like (anything with the buffer protocol); a
``str`` is refused, because offsets are byte offsets.

Verdicts match ``json.loads(body.decode("utf-8"))`` (strict decoding, strict
control characters) except that ``NaN``/``Infinity`` are rejected (RFC 8259)
and nesting is limited (``max_depth``, default 512 open arrays/objects).

Strings decode like Python's ``json``: escapes, surrogate pairs, and lone
surrogate escapes (kept as lone surrogates in the returned ``str``).
"""

from ._scoring import ffi, lib
from .errors import error_for

__all__ = [
    "JSON_TYPES",
    "json_validate",
    "json_scan",
    "json_edit",
    "json_apply",
    "json_plan",
    "json_get",
    "json_u32_array",
    "json_int64",
    "json_string_decode",
    "json_string_encode",
]

#: Type names, indexed by ``omni_json_type_t``.
JSON_TYPES = ("null", "false", "true", "number", "string", "array", "object")

_OPS = {"set": lib.OMNI_JSON_SET, "delete": lib.OMNI_JSON_DELETE}

# Output buffers are written by C before they are read: skip the zeroing.
_new_raw = ffi.new_allocator(should_clear_after_alloc=False)


def _buffer(body):
    if isinstance(body, str):
        raise TypeError("JSON bodies are bytes-like, not str")
    return ffi.from_buffer("uint8_t[]", body)


def _key_bytes(key):
    if isinstance(key, str):
        # lone surrogates become their WTF-8 form, as the library decodes
        # keys; never an exception here
        return key.encode("utf-8", "surrogatepass")
    return bytes(key)


def _raise_scan(rc, doc):
    msg = ffi.string(doc.err_msg).decode() if doc.err_msg else ""
    if rc in (lib.OMNI_EJSON, lib.OMNI_EDEPTH):
        err = error_for(rc, f"{msg} at byte {doc.err_off}")
        err.offset = doc.err_off
        raise err
    raise error_for(rc, msg or "json scan")


class _Scan:
    """A validated document: its buffer, members (if an object) and doc."""

    __slots__ = ("body", "buf", "members", "doc")

    def __init__(self, body, max_depth=0, want_members=True):
        self.body = body
        self.buf = _buffer(body)
        self.doc = doc = ffi.new("omni_json_doc_t *")
        cap = 32 if want_members else 0
        while True:
            self.members = _new_raw("omni_json_member_t[]", cap) if cap else ffi.NULL
            rc = lib.omni_json_scan(self.buf, len(self.buf), max_depth,
                                    self.members, cap, doc)
            if rc == lib.OMNI_ERANGE:
                if not want_members:
                    break           # valid; we asked for no members
                cap = doc.n_members
                continue
            if rc < 0:
                _raise_scan(rc, doc)
            break

    @property
    def type(self):
        return JSON_TYPES[self.doc.type]

    def require_object(self, what):
        if self.doc.type != lib.OMNI_JSON_OBJECT:
            raise error_for(lib.OMNI_ETYPE,
                            f"{what}: top-level value is {self.type}, not an object")

    def raw(self, off, length):
        return bytes(self.buf[off:off + length])


def _decode_span(buf, off, length):
    """Decode the validated string literal at buf[off, off+length)."""
    cap = length
    while True:
        out = _new_raw("uint8_t[]", max(cap, 1))
        n = ffi.new("size_t *")
        rc = lib.omni_json_string_decode(buf, off, length, out, cap, n)
        if rc == lib.OMNI_ERANGE:           # cannot happen: decoding shrinks
            cap = n[0]
            continue
        if rc < 0:
            raise error_for(rc, "string decode")
        return ffi.buffer(out, n[0])[:].decode("utf-8", "surrogatepass")


def json_validate(body, max_depth=0):
    """Validate ``body``; return its top-level type name ("object", ...).

    Raises :class:`JSONError` (a ``ValueError``) when it is not valid JSON,
    :class:`JSONDepthError` when nested deeper than ``max_depth``.
    """
    return _Scan(body, max_depth, want_members=False).type


def json_scan(body, max_depth=0):
    """The members of the top-level object, in document order, duplicates
    included: a list of ``(key: str, type: str, raw_value: bytes)``.

    Raises :class:`JSONError` if invalid, :class:`JSONTypeError` (also a
    ``ValueError`` and ``TypeError``) if the top-level value is not an object.
    """
    scan = _Scan(body, max_depth)
    scan.require_object("json_scan")
    out = []
    buf = scan.buf
    for i in range(scan.doc.n_members):
        m = scan.members[i]
        if m.key_escaped:
            key = _decode_span(buf, m.key_off, m.key_len)
        else:
            key = scan.raw(m.key_off + 1, m.key_len - 2).decode("utf-8")
        out.append((key, JSON_TYPES[m.type], scan.raw(m.val_off, m.val_len)))
    return out


def _edit_array(edits):
    """cffi edit array for [(op, key, value?), ...]: (array, n, keep, extra)
    where keep holds the buffers the array points into and extra bounds the
    bytes the edits may add to a body."""
    n = len(edits)
    if n > lib.OMNI_JSON_MAX_EDITS:
        raise ValueError(f"at most {lib.OMNI_JSON_MAX_EDITS} edits, got {n}")
    arr = ffi.new("omni_json_edit_t[]", max(n, 1))
    keep = []
    extra = 0
    for i, edit in enumerate(edits):
        op = edit[0]
        if op not in _OPS:
            raise ValueError(f"unknown edit op {op!r} (want 'set' or 'delete')")
        key = _key_bytes(edit[1])
        kbuf = ffi.from_buffer("char[]", key)
        keep.append(kbuf)
        arr[i].op = _OPS[op]
        arr[i].key = kbuf
        arr[i].key_len = len(key)
        if op == "set":
            if len(edit) != 3:
                raise ValueError("a 'set' edit is ('set', key, raw_json_value)")
            value = edit[2]
            if isinstance(value, str):
                value = value.encode("utf-8")
            value = bytes(value)
            json_validate(value)    # the library trusts the caller on this
            vbuf = ffi.from_buffer("uint8_t[]", value)
            keep.append(vbuf)
            arr[i].value = vbuf
            arr[i].value_len = len(value)
            extra += len(value) + 6 * len(key) + 4
        elif len(edit) != 2:
            raise ValueError("a 'delete' edit is ('delete', key)")
    return arr, n, keep, extra


def json_apply(body, edits, max_depth=0):
    """Apply top-level ``edits`` in order; return the new body (bytes).

    ``edits`` is a sequence of ``("set", key, raw_json_value)`` and
    ``("delete", key)``.  SET gives the last member named ``key`` the new
    value in place (earlier duplicates removed) or appends it last; DELETE
    removes every member named ``key``.  Everything else, nested content and
    whitespace included, is copied byte for byte.  ``raw_json_value`` must be
    one valid JSON value (checked; :class:`JSONError` otherwise).
    """
    scan = _Scan(body, max_depth)
    scan.require_object("json_apply")
    arr, n, keep, extra = _edit_array(edits)
    cap = len(scan.buf) + extra
    out_len = ffi.new("size_t *")
    while True:
        out = _new_raw("uint8_t[]", max(cap, 1))
        rc = lib.omni_json_apply(scan.buf, len(scan.buf), scan.members,
                                 scan.doc.n_members, arr, n, out, cap, out_len)
        if rc == lib.OMNI_ERANGE:
            cap = out_len[0]
            continue
        if rc < 0:
            raise error_for(rc, "json_apply")
        del keep
        return ffi.buffer(out, out_len[0])[:]


def json_plan(body, edits, max_depth=0):
    """Like :func:`json_apply`, but return the plan: the list of segments
    (``bytes``) whose concatenation is the new body, as nginx would send them.
    """
    scan = _Scan(body, max_depth)
    scan.require_object("json_plan")
    arr, n, keep, _ = _edit_array(edits)
    cap = 2 * scan.doc.n_members + 6 * n + 4
    scratch_cap = sum(6 * len(_key_bytes(e[1])) + 2 for e in edits)
    segs = _new_raw("omni_json_seg_t[]", cap)
    scratch = _new_raw("uint8_t[]", max(scratch_cap, 1))
    nseg = ffi.new("size_t *")
    out_len = ffi.new("size_t *")
    rc = lib.omni_json_plan(scan.buf, len(scan.buf), scan.members,
                            scan.doc.n_members, arr, n, segs, cap, nseg,
                            out_len, scratch, scratch_cap)
    if rc < 0:
        raise error_for(rc, "json_plan")
    out = [ffi.buffer(segs[i].ptr, segs[i].len)[:] for i in range(nseg[0])]
    del keep
    return out


def json_edit(body, set=None, delete=(), max_depth=0):    # noqa: A002
    """Edit top-level keys of the JSON object ``body``; return new bytes.

    ``set`` maps keys to raw JSON values (bytes or str text, e.g. ``b"1"``,
    ``b'{"a": null}'``); ``delete`` is an iterable of keys.  Deletions apply
    first, then the sets in the dict's order (so a key in both ends up set,
    appended last).  Nested keys are never touched, whatever they are called.
    Invalid JSON raises :class:`JSONError` (a ``ValueError``); a top-level
    value that is not an object raises :class:`JSONTypeError` (also a
    ``ValueError``).
    """
    edits = [("delete", k) for k in delete]
    if set:
        edits.extend(("set", k, v) for k, v in set.items())
    return json_apply(body, edits, max_depth)


def _locate(body, path, max_depth=0):
    """(scan, off, len, type) of the value at ``path`` (keys and indices)."""
    scan = _Scan(body, max_depth, want_members=False)
    buf = scan.buf
    off, length, typ = scan.doc.root_off, scan.doc.root_len, scan.doc.type
    vo = ffi.new("size_t *")
    vl = ffi.new("size_t *")
    vt = ffi.new("int *")
    for step in path:
        if isinstance(step, bool) or not isinstance(step, (str, bytes, int)):
            raise TypeError(f"path steps are str keys or int indices, not {step!r}")
        if isinstance(step, int):
            if typ != lib.OMNI_JSON_ARRAY:
                raise error_for(lib.OMNI_ETYPE,
                                f"index {step} into a {JSON_TYPES[typ]}")
            index = step
            if index < 0:
                count = ffi.new("size_t *")
                rc = lib.omni_json_array_count(buf, off, length, count)
                if rc < 0:
                    raise error_for(rc, "array count")
                index += count[0]
                if index < 0:
                    raise error_for(lib.OMNI_ENOTFOUND, f"index {step}")
            rc = lib.omni_json_array_get(buf, off, length, index, vo, vl, vt)
        else:
            if typ != lib.OMNI_JSON_OBJECT:
                raise error_for(lib.OMNI_ETYPE,
                                f"key {step!r} in a {JSON_TYPES[typ]}")
            key = _key_bytes(step)
            rc = lib.omni_json_object_get(buf, off, length, key, len(key),
                                          vo, vl, vt)
        if rc < 0:
            raise error_for(rc, f"path step {step!r}")
        off, length, typ = vo[0], vl[0], vt[0]
    return scan, off, length, typ


def json_get(body, *path, max_depth=0):
    """Raw JSON text (bytes) of the value at ``path`` inside ``body``.

    Steps are ``str`` keys (last duplicate wins) and ``int`` indices
    (negative counts from the end).  Missing keys/indices raise
    :class:`NotFoundError` (a ``LookupError``); stepping into a scalar raises
    :class:`JSONTypeError`.  The whole body is validated first.
    """
    scan, off, length, _ = _locate(body, path, max_depth)
    return scan.raw(off, length)


def json_u32_array(body, *path, max_depth=0):
    """The array at ``path`` as a list of ints in [0, 2**32).

    Every element must be an integer literal without fraction or exponent
    (``1.0``, ``2e3``, ``-1``, ``true`` raise :class:`JSONTypeError`).
    """
    scan, off, length, typ = _locate(body, path, max_depth)
    if typ != lib.OMNI_JSON_ARRAY:
        raise error_for(lib.OMNI_ETYPE, f"{JSON_TYPES[typ]} is not an array")
    cap = length // 2 + 1       # every element takes a digit and a comma
    out = _new_raw("uint32_t[]", cap)
    n = ffi.new("size_t *")
    rc = lib.omni_json_u32_array(scan.buf, off, length, out, cap, n)
    if rc < 0:
        raise error_for(rc, "u32 array")
    return ffi.unpack(out, n[0])


def json_int64(body, *path, max_depth=0):
    """The number at ``path`` as an int; integral floats (``2.0``, ``2e3``)
    are accepted, fractions and values outside int64 raise
    :class:`JSONTypeError`."""
    scan, off, length, typ = _locate(body, path, max_depth)
    v = ffi.new("int64_t *")
    rc = lib.omni_json_int64(scan.buf, off, length, v)
    if rc < 0:
        raise error_for(rc, "int64")
    return v[0]


def json_string_decode(raw):
    """Decode a JSON string literal (``raw`` includes the quotes) to str,
    exactly as ``json.loads`` would (lone surrogate escapes included)."""
    scan = _Scan(raw, want_members=False)
    if scan.doc.type != lib.OMNI_JSON_STRING:
        raise error_for(lib.OMNI_ETYPE, f"{scan.type} is not a string")
    return _decode_span(scan.buf, scan.doc.root_off, scan.doc.root_len)


def json_string_encode(text):
    """Encode ``text`` (str or UTF-8 bytes) as a JSON string literal (bytes).

    Escapes ``"``, ``\\`` and control characters; everything else is kept
    as UTF-8.  Invalid UTF-8 (and lone surrogates in a str) become U+FFFD,
    one per maximal invalid subsequence, like ``bytes.decode("utf-8",
    "replace")``.
    """
    if isinstance(text, str):
        data = text.encode("utf-8", "surrogatepass")
    else:
        data = bytes(text)
    src = ffi.from_buffer("uint8_t[]", data)
    cap = 6 * len(data) + 2
    out = _new_raw("uint8_t[]", cap)
    n = ffi.new("size_t *")
    rc = lib.omni_json_string_encode(src, len(data), out, cap, n)
    if rc < 0:
        raise error_for(rc, "string encode")
    return ffi.buffer(out, n[0])[:]
