"""Raw cffi tests of omni_json.h: argument checks, buffer sizing, segment
pointers, and robustness of the nested readers on unvalidated input.

The Pythonic layer (omni_ctl.scoring.jsonscan) has the behavioural tests.
"""

import random

import pytest

from omni_ctl.scoring._scoring import ffi, lib


def cbuf(data):
    """An exactly sized copy of data (no NUL after it: ASan sees overreads)."""
    buf = ffi.new("uint8_t[]", max(len(data), 1))
    ffi.memmove(buf, data, len(data))
    return buf


def scan(body, cap=64, max_depth=0):
    buf = cbuf(body)
    members = ffi.new("omni_json_member_t[]", max(cap, 1))
    doc = ffi.new("omni_json_doc_t *")
    rc = lib.omni_json_scan(buf, len(body), max_depth, members, cap, doc)
    return rc, buf, members, doc


def span(body, off, length):
    return body[off:off + length]


def addr(ptr):
    return int(ffi.cast("uintptr_t", ptr))


def edits_array(edits):
    arr = ffi.new("omni_json_edit_t[]", max(len(edits), 1))
    keep = []
    for i, (op, key, value) in enumerate(edits):
        k = ffi.new("char[]", key)
        keep.append(k)
        arr[i].op = op
        arr[i].key = k
        arr[i].key_len = len(key)
        if value is not None:
            v = cbuf(value)
            keep.append(v)
            arr[i].value = v
            arr[i].value_len = len(value)
    return arr, keep


def test_smoke_scan_members_and_find():
    body = b' {"a" : 1, "b":[{"a":2}], "\\u0061": "x", "c": {}} '
    rc, buf, m, doc = scan(body)
    assert rc == lib.OMNI_OK
    assert doc.type == lib.OMNI_JSON_OBJECT
    assert (doc.root_off, doc.root_len) == (1, len(body) - 2)
    assert doc.n_members == 4
    got = [(span(body, m[i].key_off, m[i].key_len),
            span(body, m[i].val_off, m[i].val_len), m[i].type, m[i].key_escaped)
           for i in range(4)]
    assert got == [
        (b'"a"', b"1", lib.OMNI_JSON_NUMBER, 0),
        (b'"b"', b'[{"a":2}]', lib.OMNI_JSON_ARRAY, 0),
        (b'"\\u0061"', b'"x"', lib.OMNI_JSON_STRING, 1),
        (b'"c"', b"{}", lib.OMNI_JSON_OBJECT, 0),
    ]
    # the last duplicate wins, escaped keys compare decoded
    assert lib.omni_json_find(buf, m, 4, b"a", 1) == 2
    assert lib.omni_json_find(buf, m, 2, b"a", 1) == 0
    assert lib.omni_json_find(buf, m, 4, b"c", 1) == 3
    assert lib.omni_json_find(buf, m, 4, b"d", 1) == -1
    assert lib.omni_json_find(buf, m, 4, b"", 0) == -1


def test_strerror_and_version():
    assert ffi.string(lib.omni_strerror(lib.OMNI_EJSON)) == b"invalid JSON"
    assert ffi.string(lib.omni_version())


def test_scan_argument_checks():
    doc = ffi.new("omni_json_doc_t *")
    m = ffi.new("omni_json_member_t[4]")
    buf = cbuf(b"{}")
    assert lib.omni_json_scan(buf, 2, 0, m, 4, ffi.NULL) == lib.OMNI_EINVAL
    assert lib.omni_json_scan(ffi.NULL, 0, 0, m, 4, doc) == lib.OMNI_EINVAL
    assert lib.omni_json_scan(buf, 2, 0, ffi.NULL, 4, doc) == lib.OMNI_EINVAL
    assert lib.omni_json_scan(buf, 2, 0, ffi.NULL, 0, doc) == lib.OMNI_OK
    assert lib.omni_json_scan(buf, 1 << 32, 0, m, 4, doc) == lib.OMNI_EINVAL
    limit = lib.OMNI_JSON_MAX_DEPTH_LIMIT
    assert lib.omni_json_scan(buf, 2, limit, m, 4, doc) == lib.OMNI_OK
    assert lib.omni_json_scan(buf, 2, limit + 1, m, 4, doc) == lib.OMNI_EINVAL


def test_scan_erange_reports_count_and_fills_cap():
    body = b'{"a":1,"b":2,"c":3}'
    rc, buf, m, doc = scan(body, cap=2)
    assert rc == lib.OMNI_ERANGE
    assert doc.n_members == 3
    assert span(body, m[1].key_off, m[1].key_len) == b'"b"'
    # invalid beats "too many": the verdict comes first
    rc, *_ = scan(b'{"a":1,"b":2,"c":}', cap=1)
    assert rc == lib.OMNI_EJSON


def test_scan_error_offset_and_message():
    body = b'{"a": [1, 2,, 3]}'
    rc, buf, m, doc = scan(body)
    assert rc == lib.OMNI_EJSON
    assert doc.err_off == body.index(b",,") + 1
    assert ffi.string(doc.err_msg)
    rc, buf, m, doc = scan(b"[" * 10 + b"]" * 10, max_depth=9)
    assert rc == lib.OMNI_EDEPTH
    assert doc.err_off == 9


def test_plan_segments_point_into_input_and_respect_bound():
    body = (b'{"model": "m", "stream": true, "x": {"stream": 1}, '
            b'"max_tokens": 50, "stream_options": {"include_usage": true}}')
    rc, buf, m, doc = scan(body)
    assert rc == lib.OMNI_OK
    n = doc.n_members
    edits, keep = edits_array([
        (lib.OMNI_JSON_SET, b"max_tokens", b"1"),
        (lib.OMNI_JSON_SET, b"stream", b"false"),
        (lib.OMNI_JSON_DELETE, b"stream_options", None),
        (lib.OMNI_JSON_SET, b"kv_transfer_params", b'{"do_remote_decode": true}'),
    ])
    cap = 2 * n + 6 * 4 + 4
    segs = ffi.new("omni_json_seg_t[]", cap)
    nseg = ffi.new("size_t *")
    out_len = ffi.new("size_t *")
    rc = lib.omni_json_plan(buf, len(body), m, n, edits, 4, segs, cap, nseg,
                            out_len, ffi.NULL, 0)
    assert rc == lib.OMNI_OK
    pieces = [ffi.buffer(segs[i].ptr, segs[i].len)[:] for i in range(nseg[0])]
    out = b"".join(pieces)
    assert len(out) == out_len[0]
    assert out == (b'{"model": "m", "stream": false, "x": {"stream": 1}, '
                   b'"max_tokens": 1,"kv_transfer_params":{"do_remote_decode": true}}')
    # the untouched stretch before the first edit is one segment in the input
    assert addr(segs[0].ptr) == addr(buf)
    assert pieces[0] == b'{"model": "m", "stream": '
    lo, hi = addr(buf), addr(buf) + len(body)
    inside = [lo <= addr(segs[i].ptr) < hi for i in range(nseg[0])]
    assert inside.count(True) >= 3

    # too few segments: ERANGE with the count needed
    small = ffi.new("omni_json_seg_t[]", 2)
    rc = lib.omni_json_plan(buf, len(body), m, n, edits, 4, small, 2, nseg,
                            out_len, ffi.NULL, 0)
    assert rc == lib.OMNI_ERANGE
    assert nseg[0] == len(pieces)

    # apply: exact, short and NULL buffers
    outbuf = ffi.new("uint8_t[]", len(out))
    assert lib.omni_json_apply(buf, len(body), m, n, edits, 4, outbuf,
                               len(out), out_len) == lib.OMNI_OK
    assert ffi.buffer(outbuf, len(out))[:] == out
    assert lib.omni_json_apply(buf, len(body), m, n, edits, 4, outbuf,
                               len(out) - 1, out_len) == lib.OMNI_ERANGE
    assert out_len[0] == len(out)
    assert lib.omni_json_apply(buf, len(body), m, n, edits, 4, ffi.NULL, 0,
                               out_len) == lib.OMNI_ERANGE
    assert out_len[0] == len(out)


def test_plan_no_edits_is_one_segment():
    body = b' { "a" : [1, {"b": 2}] ,"c":"d" } \n'
    rc, buf, m, doc = scan(body)
    segs = ffi.new("omni_json_seg_t[8]")
    nseg = ffi.new("size_t *")
    out_len = ffi.new("size_t *")
    rc = lib.omni_json_plan(buf, len(body), m, doc.n_members, ffi.NULL, 0,
                            segs, 8, nseg, out_len, ffi.NULL, 0)
    assert rc == lib.OMNI_OK
    assert nseg[0] == 1
    assert ffi.buffer(segs[0].ptr, segs[0].len)[:] == body


def test_plan_escaped_key_needs_scratch():
    body = b'{"a": 1}'
    rc, buf, m, doc = scan(body)
    edits, keep = edits_array([(lib.OMNI_JSON_SET, b'q"k\n', b"2")])
    segs = ffi.new("omni_json_seg_t[16]")
    nseg = ffi.new("size_t *")
    out_len = ffi.new("size_t *")
    rc = lib.omni_json_plan(buf, len(body), m, 1, edits, 1, segs, 16, nseg,
                            out_len, ffi.NULL, 0)
    assert rc == lib.OMNI_ERANGE
    expected = b'{"a": 1,"q\\"k\\n":2}'
    assert out_len[0] == len(expected)
    scratch = ffi.new("uint8_t[]", 6 * 4 + 2)
    rc = lib.omni_json_plan(buf, len(body), m, 1, edits, 1, segs, 16, nseg,
                            out_len, scratch, 6 * 4 + 2)
    assert rc == lib.OMNI_OK
    got = b"".join(ffi.buffer(segs[i].ptr, segs[i].len)[:] for i in range(nseg[0]))
    assert got == expected


def test_plan_argument_checks():
    body = b'{"a": 1}'
    rc, buf, m, doc = scan(body)
    nseg = ffi.new("size_t *")
    out_len = ffi.new("size_t *")
    segs = ffi.new("omni_json_seg_t[64]")

    def plan(edits, n=None):
        arr, keep = edits_array(edits)
        return lib.omni_json_plan(buf, len(body), m, 1, arr,
                                  len(edits) if n is None else n, segs, 64,
                                  nseg, out_len, ffi.NULL, 0)

    assert plan([(lib.OMNI_JSON_SET, b"a", None)]) == lib.OMNI_EINVAL
    assert plan([(7, b"a", b"1")]) == lib.OMNI_EINVAL
    many = [(lib.OMNI_JSON_DELETE, b"a", None)] * (lib.OMNI_JSON_MAX_EDITS + 1)
    assert plan(many) == lib.OMNI_EINVAL
    assert plan(many[:lib.OMNI_JSON_MAX_EDITS]) == lib.OMNI_OK
    # members that do not fit the buffer are refused, not followed
    m[0].val_off = 100
    assert plan([]) == lib.OMNI_EINVAL
    # not an object
    rc, abuf, am, adoc = scan(b" [1, 2]")
    assert rc == lib.OMNI_OK and adoc.type == lib.OMNI_JSON_ARRAY
    assert lib.omni_json_plan(abuf, 7, am, 0, ffi.NULL, 0, segs, 64, nseg,
                              out_len, ffi.NULL, 0) == lib.OMNI_ETYPE


def test_readers_on_spans():
    body = b'{"p": [10, 20 , 4294967295], "o": {"k": "v", "k": -3.0e1}}'
    rc, buf, m, doc = scan(body)
    p = m[0]
    n = ffi.new("size_t *")
    assert lib.omni_json_array_count(buf, p.val_off, p.val_len, n) == 0
    assert n[0] == 3
    out = ffi.new("uint32_t[3]")
    assert lib.omni_json_u32_array(buf, p.val_off, p.val_len, out, 3, n) == 0
    assert list(out) == [10, 20, 4294967295]
    assert lib.omni_json_u32_array(buf, p.val_off, p.val_len, out, 2, n) \
        == lib.OMNI_ERANGE
    assert n[0] == 3
    vo, vl, vt = ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("int *")
    o = m[1]
    assert lib.omni_json_object_get(buf, o.val_off, o.val_len, b"k", 1,
                                    vo, vl, vt) == 0
    assert span(body, vo[0], vl[0]) == b"-3.0e1"
    v = ffi.new("int64_t *")
    assert lib.omni_json_int64(buf, vo[0], vl[0], v) == 0 and v[0] == -30
    assert lib.omni_json_array_get(buf, o.val_off, o.val_len, 0, vo, vl, vt) \
        == lib.OMNI_ETYPE
    assert lib.omni_json_object_get(buf, p.val_off, p.val_len, b"k", 1,
                                    vo, vl, vt) == lib.OMNI_ETYPE
    assert lib.omni_json_array_get(buf, p.val_off, p.val_len, 3, vo, vl, vt) \
        == lib.OMNI_ENOTFOUND


def test_string_encode_sizes():
    n = ffi.new("size_t *")
    src = cbuf(b'a"\x01')
    assert lib.omni_json_string_encode(src, 3, ffi.NULL, 0, n) == lib.OMNI_ERANGE
    assert n[0] == len(b'"a\\"\\u0001"')
    out = ffi.new("uint8_t[]", n[0])
    assert lib.omni_json_string_encode(src, 3, out, n[0], n) == lib.OMNI_OK
    assert ffi.buffer(out, n[0])[:] == b'"a\\"\\u0001"'
    dec = ffi.new("uint8_t[4]")
    body = cbuf(b'"abcdef"')
    assert lib.omni_json_string_decode(body, 0, 8, dec, 4, n) == lib.OMNI_ERANGE
    assert n[0] == 6 and ffi.buffer(dec, 4)[:] == b"abcd"


_ALPHABET = b'{}[]:,"\\ \t\n0123456789-+.eEtruefalsn\x00\x1f\x80\xc3\xa9\xed\xff'


@pytest.mark.parametrize("seed", range(4))
def test_readers_never_read_outside_the_span(seed):
    """Nested readers on garbage: any answer, but no crash (ASan build)."""
    rnd = random.Random(seed)
    vo, vl, vt = ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("int *")
    n = ffi.new("size_t *")
    v = ffi.new("int64_t *")
    out = ffi.new("uint32_t[8]")
    dec = ffi.new("uint8_t[16]")
    for _ in range(2000):
        size = rnd.randrange(0, 40)
        data = bytes(rnd.choice(_ALPHABET) for _ in range(size))
        if rnd.random() < 0.5:
            data = rnd.choice([b"{", b"[", b'"']) + data
        buf = cbuf(data)
        size = len(data)
        for rc in (
            lib.omni_json_object_get(buf, 0, size, b"a", 1, vo, vl, vt),
            lib.omni_json_array_get(buf, 0, size, 1, vo, vl, vt),
            lib.omni_json_array_count(buf, 0, size, n),
            lib.omni_json_u32_array(buf, 0, size, out, 8, n),
            lib.omni_json_int64(buf, 0, size, v),
            lib.omni_json_string_decode(buf, 0, size, dec, 16, n),
        ):
            assert rc <= 0
        if lib.omni_json_object_get(buf, 0, size, b"a", 1, vo, vl, vt) == 0:
            assert vo[0] + vl[0] <= size
