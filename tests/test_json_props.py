"""Property tests: the C scanner/splicer against Python's json module on
generated and mutated documents.

Documents are generated as Python values (objects as lists of pairs, so
duplicate keys exist) and written out by a serializer that varies whitespace
and string escaping.  Keys that the proxy edits ("stream", "max_tokens",
"kv_transfer_params", ...) are planted in nested objects and string values.
"""

import json
import random
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_ctl.scoring import errors
from omni_ctl.scoring.jsonscan import (
    json_apply, json_plan, json_scan, json_string_decode, json_string_encode,
    json_get, json_int64, json_u32_array, json_validate,
)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

EDITED = ["stream", "max_tokens", "kv_transfer_params", "stream_options",
          "min_tokens", "prompt"]


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def py_loads(body, pairs=False):
    return json.loads(body.decode("utf-8"), parse_constant=_no_constants,
                      parse_int=Decimal,
                      object_pairs_hook=list if pairs else None)


def py_valid(body):
    try:
        py_loads(body)
    except ValueError:
        return False
    return True


def c_valid(body):
    try:
        json_validate(body)
    except errors.JSONError:
        return False
    return True


class Obj(list):
    """A JSON object as a list of (key, value) pairs."""


keys = st.one_of(st.sampled_from(EDITED + ["model", "messages", "", "a"]),
                 st.text(max_size=6))
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(10 ** 30), 10 ** 30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(EDITED).map(lambda k: f'"{k}": true, {k}'),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(st.tuples(keys, inner), max_size=5).map(Obj)),
    max_leaves=25)
top_objects = st.lists(st.tuples(keys, values), max_size=8).map(Obj)


def ws(rnd):
    if rnd.random() < 0.6:
        return ""
    return "".join(rnd.choice(" \t\n\r") for _ in range(rnd.randrange(1, 4)))


def dump_string(s, rnd):
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20:
            short = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
            out.append(short.get(ch) if ch in short and rnd.random() < 0.5
                       else f"\\u{code:04x}")
        elif rnd.random() < 0.1:
            if code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04X}")
            else:
                out.append(f"\\u{code:04X}" if rnd.random() < 0.5 else f"\\u{code:04x}")
        elif ch == "/" and rnd.random() < 0.5:
            out.append("\\/")
        else:
            out.append(ch)
    if rnd.random() < 0.05:
        out.append(rnd.choice(["\\ud800", "\\udfff", "\\udbff\\u0041"]))
    out.append('"')
    return "".join(out)


def dump(v, rnd):
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        text = repr(v)
        return text if rnd.random() < 0.8 else f"{v:e}".replace("e+", "E")
    if isinstance(v, str):
        return dump_string(v, rnd)
    if isinstance(v, Obj):
        items = [ws(rnd) + dump_string(k, rnd) + ws(rnd) + ":" + ws(rnd)
                 + dump(x, rnd) + ws(rnd) for k, x in v]
        return "{" + (",".join(items) if items else ws(rnd)) + "}"
    items = [ws(rnd) + dump(x, rnd) + ws(rnd) for x in v]
    return "[" + (",".join(items) if items else ws(rnd)) + "]"


def encode(v, rnd):
    return (ws(rnd) + dump(v, rnd) + ws(rnd)).encode("utf-8", "surrogatepass")


# ---- verdicts on generated and mutated documents ------------------------------

@SETTINGS
@given(values, st.randoms(use_true_random=False))
def test_generated_documents_are_valid_and_agree(v, rnd):
    body = encode(v, rnd)
    assert py_valid(body)
    assert c_valid(body)


MUTATION_BYTES = b'{}[]:,"\\ \t\n\r0123456789-+.eEtfnu\x00\x1f\x7f\x80\xbf\xc0\xc3\xe0\xed\xf0\xf4\xf5\xff'


def mutate(body, rnd):
    data = bytearray(body)
    for _ in range(rnd.randrange(1, 4)):
        kind = rnd.randrange(6)
        pos = rnd.randrange(len(data) + 1)
        if kind == 0:
            data[pos:pos] = bytes([rnd.choice(MUTATION_BYTES)])
        elif kind == 1 and data:
            del data[pos:pos + rnd.randrange(1, 4)]
        elif kind == 2 and pos < len(data):
            data[pos] = rnd.choice(MUTATION_BYTES)
        elif kind == 3 and data:
            end = rnd.randrange(pos, len(data) + 1)
            data[pos:pos] = data[pos:end][:20]
        elif kind == 4:
            del data[pos:]
        elif pos < len(data):
            data[pos] ^= 1 << rnd.randrange(8)
    return bytes(data)


@SETTINGS
@given(values, st.randoms(use_true_random=False))
def test_mutated_documents_same_verdict(v, rnd):
    body = encode(v, rnd)
    for _ in range(8):
        bad = mutate(body, rnd)
        assert c_valid(bad) == py_valid(bad), bad


@SETTINGS
@given(st.binary(max_size=60))
def test_random_bytes_same_verdict(data):
    assert c_valid(data) == py_valid(data)


@SETTINGS
@given(top_objects, st.randoms(use_true_random=False))
def test_scan_matches_python_pairs(v, rnd):
    body = encode(v, rnd)
    got = json_scan(body)
    expected = py_loads(body, pairs=True)
    assert [k for k, _, _ in got] == [k for k, _ in expected]
    assert [py_loads(raw, pairs=True) for _, _, raw in got] == [x for _, x in expected]
    for key, typ, raw in got:
        assert json_validate(raw) == typ
    if expected:
        k, x = expected[-1]
        dupes_last = [val for kk, val in expected if kk == k][-1]
        assert py_loads(json_get(body, k), pairs=True) == dupes_last


# ---- splicing -------------------------------------------------------------------

raw_values = st.one_of(
    st.sampled_from([b"1", b"false", b"null", b'"x"', b"[]", b"{}",
                     b'{"do_remote_decode": true, "remote_host": null}',
                     b' [1, {"stream": true}] ', b'"\\u0073tream"']),
    values.map(lambda v: json.dumps(v, default=list).encode()),
)
edit_ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), keys, raw_values),
        st.tuples(st.just("delete"), keys)),
    max_size=8)


def model_apply(pairs, edits):
    """The header's semantics on a list of (key, value) pairs."""
    pairs = list(pairs)
    for edit in edits:
        key = edit[1]
        idx = [i for i, (k, _) in enumerate(pairs) if k == key]
        if edit[0] == "delete":
            pairs = [p for p in pairs if p[0] != key]
            continue
        value = py_loads(edit[2], pairs=True)
        if idx:
            last = idx[-1]
            pairs[last] = (key, value)
            pairs = [p for i, p in enumerate(pairs) if i == last or p[0] != key]
        else:
            pairs.append((key, value))
    return pairs


@SETTINGS
@given(top_objects, edit_ops, st.randoms(use_true_random=False))
def test_splice_matches_model(v, edits, rnd):
    body = encode(v, rnd)
    out = json_apply(body, edits)
    assert py_valid(out)
    expected = model_apply(py_loads(body, pairs=True), edits)
    assert py_loads(out, pairs=True) == expected
    assert b"".join(json_plan(body, edits)) == out
    # members no edit names keep their exact bytes
    named = {e[1] for e in edits}
    before = [(k, raw) for k, _, raw in json_scan(body) if k not in named]
    after = [(k, raw) for k, _, raw in json_scan(out) if k not in named]
    assert before == after


@SETTINGS
@given(top_objects, st.randoms(use_true_random=False))
def test_splice_without_edits_is_identity(v, rnd):
    body = encode(v, rnd)
    assert json_apply(body, []) == body
    assert json_plan(body, []) == [body]


@SETTINGS
@given(st.lists(st.tuples(keys, values), min_size=1, max_size=6).map(Obj),
       st.randoms(use_true_random=False))
def test_deleting_every_key_leaves_an_empty_object(v, rnd):
    body = encode(v, rnd)
    # keys as written (the serializer may have added a lone surrogate)
    out = json_apply(body, [("delete", k) for k, _ in py_loads(body, pairs=True)])
    assert py_loads(out) == {}


@SETTINGS
@given(values.filter(lambda v: not isinstance(v, Obj)), st.randoms(use_true_random=False))
def test_non_object_documents_are_refused_by_the_splicer(v, rnd):
    body = encode(v, rnd)
    try:
        json_apply(body, [("set", "a", b"1")])
    except errors.JSONTypeError:
        return
    raise AssertionError("expected JSONTypeError")


# ---- numbers, arrays, strings ------------------------------------------------------

NUMBER = r"-?(0|[1-9][0-9]{0,22})(\.[0-9]{1,6})?([eE][+-]?[0-9]{1,3})?"


@SETTINGS
@given(st.from_regex(NUMBER, fullmatch=True))
def test_int64_matches_decimal(text):
    value = Decimal(text)
    integral = value == value.to_integral_value()
    fits = integral and -(2 ** 63) <= value < 2 ** 63
    try:
        got = json_int64(text.encode())
    except errors.JSONTypeError:
        assert not fits
    else:
        assert fits and got == int(value)


@SETTINGS
@given(st.lists(st.integers(0, 2 ** 32 - 1), max_size=50), st.randoms(use_true_random=False))
def test_u32_array_round_trip(ids, rnd):
    body = encode(Obj([("prompt", ids), ("x", [1.5])]), rnd)
    key = py_loads(body, pairs=True)[0][0]      # may carry a lone surrogate
    assert json_u32_array(body, key) == ids


@SETTINGS
@given(st.lists(st.one_of(st.integers(-(2 ** 33), 2 ** 33), st.floats(allow_nan=False, allow_infinity=False),
                          st.booleans()), min_size=1, max_size=10))
def test_u32_array_rejects_what_is_not_u32(items):
    body = json.dumps(items).encode()
    ok = all(type(x) is int and 0 <= x < 2 ** 32 for x in items)
    try:
        got = json_u32_array(body)
    except errors.JSONTypeError:
        assert not ok
    else:
        assert ok and got == items


any_text = st.text(st.characters(exclude_categories=()), max_size=40)


@SETTINGS
@given(any_text, st.randoms(use_true_random=False))
def test_string_decode_matches_python(s, rnd):
    raw = dump_string(s, rnd).encode("utf-8", "surrogatepass")
    if py_valid(raw):
        assert json_string_decode(raw) == py_loads(raw)
    else:   # a raw lone surrogate: not UTF-8, so not JSON
        assert any(0xD800 <= ord(c) < 0xE000 for c in s)
        assert not c_valid(raw)
    ascii_raw = json.dumps(s).encode()
    assert json_string_decode(ascii_raw) == s


@SETTINGS
@given(st.text(max_size=40))
def test_string_encode_round_trip(s):
    enc = json_string_encode(s)
    assert json.loads(enc) == s
    assert json_string_decode(enc) == s


@SETTINGS
@given(st.binary(max_size=40))
def test_string_encode_replaces_bad_utf8_like_python(data):
    assert json.loads(json_string_encode(data)) == data.decode("utf-8", "replace")


def test_huge_generated_document():
    rnd = random.Random(7)
    doc = Obj([("messages", [Obj([("role", "user"), ("content", "stream " * 20000 + "é😀" * 1000),
                                  ("stream", True)])] * 20),
               ("prompt", list(range(50000))), ("stream", True)])
    body = encode(doc, rnd)
    assert len(body) > 2_000_000
    out = json_apply(body, [("set", "stream", b"false"), ("delete", "prompt")])
    expected = model_apply(py_loads(body, pairs=True),
                           [("set", "stream", b"false"), ("delete", "prompt")])
    assert py_loads(out, pairs=True) == expected


# ---- long runs: the 64-byte integer blocks and the UTF-8 windows -------------------

SEPARATORS = [",", ", ", " ,", ",\n", " , ", ",\t\r\n  "]
INT_MUTATIONS = [b",", b", ,", b" ", b"0", b"00", b"-", b"-0", b"1.5", b"1e3",
                 b"]", b"[", b"x", b"\x00", b"\xc3\xa9", b"99999999999", b"4294967296",
                 b'"7"', b"true", b"\n"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(0, 2 ** 32 - 1) | st.integers(0, 999), min_size=20, max_size=120),
       st.randoms(use_true_random=False), st.booleans())
def test_long_integer_arrays(ids, rnd, mutate_it):
    sep = rnd.choice(SEPARATORS)
    text = "[" + "".join(str(x) + (sep if rnd.random() < 0.9 else rnd.choice(SEPARATORS))
                         for x in ids[:-1]) + str(ids[-1]) + "]"
    body = b'{"prompt": ' + text.encode() + b', "n": 1}'
    if mutate_it:
        data = bytearray(body)
        for _ in range(rnd.randrange(1, 3)):
            pos = rnd.randrange(12, len(data) - 10)
            if rnd.random() < 0.5:
                data[pos:pos] = rnd.choice(INT_MUTATIONS)
            else:
                del data[pos:pos + rnd.randrange(1, 3)]
        body = bytes(data)
    valid = py_valid(body)
    assert c_valid(body) == valid, body
    if valid:
        expected = py_loads(body).get("prompt")
        ok = isinstance(expected, list) and all(
            isinstance(x, Decimal) and 0 <= x < 2 ** 32 for x in expected)
        try:
            got = json_u32_array(body, "prompt")
        except errors.JSONTypeError:
            assert not ok
        else:
            assert ok and got == [int(x) for x in expected]


UTF8_CHARS = ["é", "ß", "€", "中", "文", "😀", "𝄞", "a", " ", "\U0010FFFF", "\uFFFD", "\u0800"]
UTF8_BAD = [b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xc2", b"\xe0\x80\x80", b"\xe0\x9f\xbf",
            b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf0\x80\x80\x80", b"\xf0\x8f\xbf\xbf",
            b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\xe4\xb8", b"\xf0\x9f\x98",
            b"\xe4", b'"', b"\\", b"\x01", b"\xc3\xa9"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(UTF8_CHARS), min_size=10, max_size=150),
       st.randoms(use_true_random=False), st.booleans())
def test_long_utf8_strings(chars, rnd, mutate_it):
    if mutate_it:
        # between characters, so the inserted bytes are the only fault
        pos = rnd.randrange(len(chars) + 1)
        text = ("".join(chars[:pos]).encode() + rnd.choice(UTF8_BAD)
                + "".join(chars[pos:]).encode())
    else:
        text = "".join(chars).encode()
    body = b'{"content": "' + text + b'"}'
    valid = py_valid(body)
    assert c_valid(body) == valid, body
    if valid:
        raw = json_scan(body)[0][2]
        assert json_string_decode(raw) == py_loads(body)["content"]
