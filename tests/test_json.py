"""Unit tests of the JSON scanner/splicer through omni_ctl.scoring.jsonscan,
checked against Python's json module where a verdict or value is involved.

Reference verdict: json.loads(body.decode("utf-8")) with strict decoding,
NaN/Infinity refused (RFC 8259).  Property tests are in test_json_props.py.
"""

import json
from decimal import Decimal

import pytest

from omni_ctl.scoring import errors
from omni_ctl.scoring.jsonscan import (
    json_apply, json_edit, json_get, json_int64, json_plan, json_scan,
    json_string_decode, json_string_encode, json_u32_array, json_validate,
)


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def py_loads(body, pairs=False):
    return json.loads(body.decode("utf-8"), parse_constant=_no_constants,
                      parse_int=Decimal,
                      object_pairs_hook=list if pairs else None)


def py_valid(body):
    try:
        py_loads(body)
    except ValueError:          # UnicodeDecodeError and JSONDecodeError too
        return False
    return True


def c_valid(body):
    try:
        json_validate(body)
    except errors.JSONError:
        return False
    return True


def assert_same_verdict(body):
    assert c_valid(body) == py_valid(body), body[:200]


# ---- verdicts -------------------------------------------------------------

VALID = [
    b"{}", b"[]", b"0", b"-0", b"1.5e10", b"-0.0E-0", b"1E+2", b"true", b"false",
    b"null", b'""', b' \t\r\n{ } \n', b'{"":""}', b'[1,[2,[3]],{"a":{}}]',
    b'"\\u00e9\\ud83d\\ude00\\ud800\\udc00x\\udfff"', b'"\\/\\b\\f\\n\\r\\t\\"\\\\"',
    b'"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf\x7f"',
    b'{"a":1,"a":2}', b"123456789012345678901234567890", b"1e999",
    b'{"a" : [ 1 , 2 ] , "b" : { "c" : null } }',
]

INVALID = [
    b"", b" ", b"{", b"}", b"[", b"[1,]", b"[,1]", b'{"a":1,}', b'{,"a":1}',
    b'{"a"}', b'{"a":}', b'{"a" 1}', b"{1:2}", b"{'a':1}", b"01", b"-", b"+1",
    b".5", b"1.", b"1.e3", b"1e", b"1e+", b"0x10", b"- 1", b"NaN", b"Infinity",
    b"-Infinity", b"nul", b"tru", b"True", b"nulll", b"[1 2]", b"1 2", b"{}{}",
    b"{} x", b'"abc', b'"\\x"', b'"\\u12"', b'"\\u12G4"', b'"\\U0041"', b'"\\',
    b'"a\x00b"', b'"a\nb"', b'"\x1f"', b'"\x80"', b'"\xc3"', b'"\xc0\x80"',
    b'"\xe0\x80\x80"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xf8"',
    b'"\xff"', b"\xef\xbb\xbf{}", b"[1]\x00", b"\x0b1", b"\x0c1",
    b'{"a":1 "b":2}', b"[}", b"{]", b'{"a":[}', b"\xc2\xa01",
]


@pytest.mark.parametrize("body", VALID)
def test_valid_documents(body):
    assert py_valid(body)
    assert c_valid(body)


@pytest.mark.parametrize("body", INVALID)
def test_invalid_documents(body):
    assert not py_valid(body)
    with pytest.raises(errors.JSONError) as info:
        json_validate(body)
    assert isinstance(info.value, ValueError)
    assert 0 <= info.value.offset <= len(body)


def test_top_level_type_names():
    assert [json_validate(b) for b in (b"null", b"false", b"true", b"1",
                                       b'"s"', b"[]", b"{}")] == [
        "null", "false", "true", "number", "string", "array", "object"]


SPECIALS = [b'"', b"\\", b"\x00", b"\x1f", b"\x7f", b"\x80", b"\xc3\xa9",
            b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80", b"\xc3",
            b"\\n", b"\\u0041", b"\\ud800", b"\\q", b"\n"]


@pytest.mark.parametrize("special", SPECIALS)
def test_special_bytes_at_every_position_of_a_long_string(special):
    """The SIMD string scan must not lose anything at block boundaries: the
    first 16 bytes, the 128-byte AVX2 windows after them (where the CPU has
    AVX2), the 64- and 16-byte SSE2 windows and the scalar tail."""
    for pos in range(0, 300):
        text = b"a" * pos + special + b"b" * (pos % 19)
        assert_same_verdict(b'{"k": "' + text + b'"}')
        # ending right at the buffer's end, no closing quote or brace
        assert_same_verdict(b'"' + text)
        assert_same_verdict(b'"' + text + b'"')


# one position in each part of the string scan: the first 16-byte block,
# the first and the last lane of a 128-byte AVX2 window, the SSE2 windows
# after the last full 128, the scalar tail
SCAN_POSITIONS = (3, 15, 16, 16 + 63, 16 + 64, 16 + 127, 16 + 128 + 70,
                  16 + 256 + 40, 16 + 256 + 60)


def test_every_byte_value_in_every_part_of_the_string_scan():
    """Each of the 256 byte values, alone in a long run of ASCII, gets
    Python's verdict: the scan's one-compare test for '"', controls and
    non-ASCII must neither miss one nor stop at a plain byte."""
    for pos in SCAN_POSITIONS:
        for b in range(256):
            text = b"a" * pos + bytes([b]) + b"b" * 60
            assert_same_verdict(b'{"k": "' + text + b'"}')
            assert_same_verdict(b'"' + text + b'"')


UTF8_BAD = [b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xc2", b"\xe0\x80\x80",
            b"\xe0\x9f\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf0\x80\x80\x80",
            b"\xf0\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80",
            b"\xf8\x80\x80\x80", b"\xfe", b"\xff", b"\xe4\xb8", b"\xf0\x9f\x98", b"\xe4",
            b"\xc3\xa9", b"\xe4\xb8\xad", b"\xf0\x9f\x98\x80", b"\xf4\x8f\xbf\xbf",
            b"\xed\x9f\xbf", b"\xee\x80\x80", b"\xe0\xa0\x80", b"\xf0\x90\x80\x80"]


@pytest.mark.parametrize("bad", UTF8_BAD)
@pytest.mark.parametrize("char", ["é", "中", "😀", "é中😀a"])
def test_utf8_sequence_at_every_position_of_a_non_ascii_run(bad, char):
    """The 16-byte UTF-8 windows must judge every sequence, wherever it falls."""
    for count in range(0, 24):
        head = (char * count).encode()
        body = b'{"k": "' + head + bad + (char * 12).encode() + b'"}'
        assert_same_verdict(body)
        assert_same_verdict(b'"' + head + bad + b'"')


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 63, 64, 65, 1000])
def test_truncated_documents_are_invalid(size):
    body = json.dumps({"a": "x" * size, "b": [1, 2, 3], "c": {"d": "é"}},
                      ensure_ascii=False).encode()
    for cut in range(len(body)):
        assert not c_valid(body[:cut])
    assert c_valid(body)


# ---- depth ----------------------------------------------------------------

def test_depth_limit_default():
    for depth in (1, 100, 511, 512):
        deep = b"[" * depth + b"]" * depth
        assert json_validate(deep) == "array"
        assert py_valid(deep)
        obj = b'{"a":' * depth + b"1" + b"}" * depth
        assert json_validate(obj) == "object"
    for body in (b"[" * 513 + b"]" * 513, b'{"a":' * 513 + b"1" + b"}" * 513,
                 b'{"a": ' + b"[" * 512 + b"]" * 512 + b"}"):
        with pytest.raises(errors.JSONDepthError) as info:
            json_validate(body)
        assert isinstance(info.value, ValueError)
    # an unterminated document deeper than the limit is still a depth error
    with pytest.raises(errors.JSONDepthError):
        json_validate(b"[" * 100000)


def test_depth_limit_configurable():
    body = b'{"a": [[{"b": 1}]]}'      # 4 deep
    assert json_validate(body, max_depth=4) == "object"
    with pytest.raises(errors.JSONDepthError):
        json_validate(body, max_depth=3)
    assert json_scan(body, max_depth=4)[0][0] == "a"
    with pytest.raises(errors.JSONDepthError):
        json_edit(body, set={"x": b"1"}, max_depth=3)
    assert json_validate(b"[" * 5000 + b"]" * 5000, max_depth=5000) == "array"
    with pytest.raises(errors.InvalidArgumentError):
        json_validate(b"{}", max_depth=1 << 20)
    # scalars are 0 deep
    assert json_validate(b"1", max_depth=1) == "number"


# ---- scan -----------------------------------------------------------------

def test_scan_members_in_order_with_duplicates_and_escapes():
    body = (b'{"model":"m","\\u0073tream":true,"messages":[{"stream":false}],'
            b'"stream":null,"\\ud83d\\ude00":1,"\xc3\xa9":2,"":3}')
    assert json_scan(body) == [
        ("model", "string", b'"m"'),
        ("stream", "true", b"true"),
        ("messages", "array", b'[{"stream":false}]'),
        ("stream", "null", b"null"),
        ("\U0001F600", "number", b"1"),
        ("é", "number", b"2"),
        ("", "number", b"3"),
    ]


def test_scan_many_members():
    doc = {f"k{i}": i for i in range(1000)}
    body = json.dumps(doc).encode()
    got = json_scan(body)
    assert [(k, json.loads(v)) for k, _, v in got] == list(doc.items())


def test_scan_needs_an_object():
    for body in (b"[]", b"1", b'"s"', b"null"):
        with pytest.raises(errors.JSONTypeError) as info:
            json_scan(body)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, TypeError)


def test_str_bodies_are_refused():
    with pytest.raises(TypeError):
        json_validate("{}")


# ---- edit -----------------------------------------------------------------

PREFILL_BODY = (
    b'{\n  "model": "m",\n  "stream": true,\n  "stream_options": {"include_usage": true},\n'
    b'  "messages": [{"role": "user", "content": "set \\"stream\\": true and '
    b'\\"max_tokens\\": 9, kv_transfer_params"}, {"stream": true, '
    b'"max_tokens": 7, "kv_transfer_params": {"x": 1}}],\n'
    b'  "max_tokens": 100,\n  "min_tokens": 10\n}\n'
)

KV = (b'{"do_remote_decode": true, "do_remote_prefill": false, '
      b'"remote_engine_id": null, "remote_block_ids": null, '
      b'"remote_host": null, "remote_port": null}')


def test_edit_prefill_leg_leaves_nested_keys_alone():
    out = json_edit(PREFILL_BODY,
                    set={"max_tokens": b"1", "stream": b"false",
                         "kv_transfer_params": KV},
                    delete=["stream_options", "min_tokens"])
    before = py_loads(PREFILL_BODY)
    after = py_loads(out)
    assert after["messages"] == before["messages"]
    assert after["stream"] is False and after["max_tokens"] == 1
    assert "stream_options" not in after and "min_tokens" not in after
    assert after["kv_transfer_params"] == json.loads(KV)
    assert list(after) == ["model", "stream", "messages", "max_tokens",
                           "kv_transfer_params"]
    # untouched members keep their exact bytes (whitespace included)
    assert b'  "messages": [{"role"' in out and b'\n  "model": "m",\n' in out


def test_edit_replaces_never_duplicates_a_client_key():
    body = b'{"kv_transfer_params": {"old": 1}, "a": 2, "kv_transfer_params": 3}'
    out = json_edit(body, set={"kv_transfer_params": KV})
    pairs = py_loads(out, pairs=True)
    assert [k for k, _ in pairs] == ["a", "kv_transfer_params"]
    assert out.count(b"kv_transfer_params") == 1


def test_edit_on_empty_object_and_whitespace():
    assert json_edit(b"{}", set={"a": b"1"}) == b'{"a":1}'
    assert json_edit(b" { \n } ", set={"a": b"1", "b": b"[]"}) == b' {"a":1,"b":[] \n } '
    assert json_edit(b"{ }", delete=["a"]) == b"{ }"
    assert json_edit(b'{ "a" : 1 }', delete=["a"]) == b"{  }"
    assert json_edit(b'{"a":1,"b":2,"c":3}', delete=["a", "c"]) == b'{"b":2}'
    assert json_edit(b'{"a":1 , "b":2 , "c":3}', delete=["b"]) == b'{"a":1 , "c":3}'
    assert json_edit(b'{"a":1 , "b":2}', delete=["a"], set={"c": b"3"}) == b'{"b":2,"c":3}'


def test_edit_escaped_keys_match_decoded():
    body = b'{"\\u0073tream": true, "x": "\\u0073tream"}'
    assert py_loads(json_edit(body, delete=["stream"])) == {"x": "stream"}
    out = json_edit(body, set={"stream": b"false"})
    assert out == b'{"\\u0073tream": false, "x": "\\u0073tream"}'


def test_edit_keys_needing_escapes_are_written_escaped():
    out = json_edit(b"{}", set={'a"b\\c\n\u00e9\U0001F600': b"1"})
    assert py_loads(out) == {'a"b\\c\n\u00e9\U0001F600': 1}
    segments = json_plan(b"{}", [("set", "q\"", b"2")])
    assert b"".join(segments) == b'{"q\\"":2}'


def test_edit_sequential_semantics():
    body = b'{"a": 1, "b": 2, "a": 3}'
    cases = [
        ([("set", "a", b"9")], b'{"b": 2, "a": 9}'),
        ([("delete", "a")], b'{"b": 2}'),
        ([("delete", "a"), ("set", "a", b"9")], b'{"b": 2,"a":9}'),
        ([("set", "a", b"8"), ("set", "a", b"9")], b'{"b": 2, "a": 9}'),
        ([("set", "a", b"8"), ("delete", "a")], b'{"b": 2}'),
        ([("set", "z", b"1"), ("set", "y", b"2")], b'{"a": 1, "b": 2, "a": 3,"z":1,"y":2}'),
        ([("set", "z", b"1"), ("set", "y", b"2"), ("delete", "z"), ("set", "z", b"3")],
         b'{"a": 1, "b": 2, "a": 3,"y":2,"z":3}'),
        ([("set", "z", b"1"), ("set", "y", b"2"), ("set", "z", b"3")],
         b'{"a": 1, "b": 2, "a": 3,"z":3,"y":2}'),
        ([("delete", "b"), ("delete", "nope")], b'{"a": 1, "a": 3}'),
    ]
    for edits, expected in cases:
        assert json_apply(body, edits) == expected, edits
        assert b"".join(json_plan(body, edits)) == expected, edits


def test_edit_rejects_bad_input():
    with pytest.raises(errors.JSONError):
        json_edit(b'{"a": 1,}', set={"a": b"2"})
    with pytest.raises(ValueError):
        json_edit(b'{"a": [1 2]}', delete=["b"])
    with pytest.raises(errors.JSONTypeError):
        json_edit(b"[1, 2]", set={"a": b"2"})
    with pytest.raises(errors.JSONError):
        json_edit(b"{}", set={"a": b"not json"})
    with pytest.raises(errors.JSONError):
        json_edit(b"{}", set={"a": b""})
    with pytest.raises(errors.JSONError):
        json_edit(b"{}", set={"a": b"1 2"})
    with pytest.raises(ValueError):
        json_apply(b"{}", [("rename", "a", b"1")])
    with pytest.raises(ValueError):
        json_apply(b"{}", [("delete", "a")] * 65)


def test_edit_huge_string_member_is_copied_unchanged():
    text = ("x" * 1000 + "\\n\\\"é€😀\\ud800" + "y" * 777) * 3000   # ~5.4 MB
    body = b'{"prompt": "' + text.encode() + b'", "stream": true}'
    out = json_edit(body, set={"stream": b"false", "max_tokens": b"1"})
    assert out == body[:-len(b"true}")] + b'false,"max_tokens":1}'
    assert len(json_scan(out)) == 3


def test_json_edit_accepts_bytes_like_bodies():
    body = bytearray(b'{"a": 1}')
    assert json_edit(body, set={"a": b"2"}) == b'{"a": 2}'
    assert json_edit(memoryview(b'{"a": 1}'), delete=["a"]) == b"{}"


# ---- nested get -------------------------------------------------------------

def test_get_nested_paths():
    body = (b'{"a": {"b": [10, {"c": "d"}, [true]], "b2": null}, '
            b'"a": {"b": [1, 2]}, "e": "f"}')
    assert json_get(body) == body
    assert json_get(body, "a") == b'{"b": [1, 2]}'       # last duplicate wins
    assert json_get(body, "a", "b", 1) == b"2"
    assert json_get(body, "a", "b", -1) == b"2"
    assert json_get(body, "a", "b", -2) == b"1"
    assert json_get(b' [ 1 , [ 2 , 3 ] ] ', 1, 0) == b"2"
    assert json_get(b'{"k\\u00e9": {"x": 5}}', "ké", "x") == b"5"
    with pytest.raises(errors.NotFoundError) as info:
        json_get(body, "zz")
    assert isinstance(info.value, LookupError)
    with pytest.raises(errors.NotFoundError):
        json_get(body, "a", "b", 2)
    with pytest.raises(errors.NotFoundError):
        json_get(body, "a", "b", -3)
    with pytest.raises(errors.JSONTypeError):
        json_get(body, "e", "x")
    with pytest.raises(errors.JSONTypeError):
        json_get(body, 0)
    with pytest.raises(errors.JSONError):
        json_get(b'{"a": 1', "a")
    with pytest.raises(TypeError):
        json_get(body, 1.5)


# ---- u32 arrays and int64 ---------------------------------------------------

def test_u32_array_bounds_and_types():
    assert json_u32_array(b"[]") == []
    assert json_u32_array(b"[ 0 ]") == [0]
    assert json_u32_array(b"[4294967295, 0, 7]") == [4294967295, 0, 7]
    assert json_u32_array(b"[-0]") == [0]
    assert json_u32_array(b'{"prompt": [1,2 , 3\n,4]}', "prompt") == [1, 2, 3, 4]
    for bad in (b"[4294967296]", b"[-1]", b"[1.5]", b"[1.0]", b"[2e3]",
                b"[true]", b'["1"]', b"[[1]]", b"[null]", b"[1, {}]",
                b"[99999999999999999999]", b"[1E2]"):
        with pytest.raises(errors.JSONTypeError):
            json_u32_array(bad)
    with pytest.raises(errors.JSONTypeError):
        json_u32_array(b'{"prompt": "text"}', "prompt")
    with pytest.raises(errors.JSONError):
        json_u32_array(b"[1, 2,]")


def test_u32_array_long_token_prompt():
    ids = [(i * 2654435761) % 4294967296 for i in range(100000)]
    body = json.dumps({"prompt": ids, "max_tokens": 5}).encode()
    assert json_u32_array(body, "prompt") == ids


INT64_CASES = [
    (b"0", 0), (b"-0", 0), (b"2.0", 2), (b"2e3", 2000), (b"2E+3", 2000),
    (b"-2.50e1", -25), (b"1500e-3", None), (b"15000e-3", 15), (b"0.05e2", 5),
    (b"0.5", None), (b"1e-1", None), (b"0e999999999999", 0),
    (b"9223372036854775807", 9223372036854775807),
    (b"-9223372036854775808", -9223372036854775808),
    (b"9223372036854775808", None), (b"-9223372036854775809", None),
    (b"9.223372036854775807e18", 9223372036854775807),
    (b"1e19", None), (b"1e18", 10 ** 18), (b"100000000000000000000e-2", 10 ** 18),
    (b"0.0000000000000000000000000001e28", 1), (b"1e999999999999999999", None),
    (b"123.456e3", 123456), (b"123.4560e2", None),
]


@pytest.mark.parametrize("text,value", INT64_CASES)
def test_int64(text, value):
    if value is None:
        with pytest.raises(errors.JSONTypeError):
            json_int64(text)
    else:
        assert json_int64(text) == value
        assert Decimal(text.decode()) == value


def test_int64_needs_a_number():
    for body in (b'"1"', b"true", b"[1]", b"null"):
        with pytest.raises(errors.JSONTypeError):
            json_int64(body)
    assert json_int64(b'{"n": [1, -7]}', "n", 1) == -7


# ---- strings ------------------------------------------------------------------

def test_string_decode_matches_python():
    for raw in (b'""', b'"abc"', b'"\\u00e9\\u20AC\\ud83d\\ude00"',
                b'"\\ud800"', b'"\\udc00\\ud800"', b'"\\ud800\\u0041"',
                b'"\\ud800\\ud800\\udc00"', b'"\\u0000\\n\\t\\/\\\\\\""',
                b'"\xc3\xa9\xf0\x9f\x98\x80"', b'"x' + b"a" * 5000 + b'\\n"'):
        assert json_string_decode(raw) == json.loads(raw.decode())
    with pytest.raises(errors.JSONTypeError):
        json_string_decode(b"1")
    with pytest.raises(errors.JSONError):
        json_string_decode(b'"abc')


def test_string_encode_matches_python():
    for text in ("", "plain", 'q"uote\\', "\x00\x01\x1f\x7f", "\b\f\n\r\t",
                 "é€😀", "a" * 10000 + "\n",
                 "a" * 200 + '"' + "b" * 150 + "\x01" + "c" * 127 + "\\"):
        enc = json_string_encode(text)
        assert json.loads(enc) == text
        assert enc == json.dumps(text, ensure_ascii=False).encode()
    assert json_string_encode(b"a\xffb\xc3") == '"a\ufffdb\ufffd"'.encode()
    assert json.loads(json_string_encode(b"\xed\xa0\x80")) == "\ufffd" * 3
    assert json.loads(json_string_encode("x\ud800")) == "x" + "\ufffd" * 3


# ---- error translation ----------------------------------------------------------

def test_error_classes_subclass_builtins():
    from omni_ctl.scoring._scoring import lib
    cases = {
        lib.OMNI_ENOMEM: MemoryError, lib.OMNI_EINVAL: ValueError,
        lib.OMNI_ERANGE: OverflowError, lib.OMNI_EJSON: ValueError,
        lib.OMNI_ETYPE: TypeError, lib.OMNI_ENOTFOUND: LookupError,
        lib.OMNI_EFULL: RuntimeError, lib.OMNI_EINTEGRITY: RuntimeError,
        lib.OMNI_EDEPTH: ValueError, lib.OMNI_EHOLD: RuntimeError,
    }
    for code, builtin in cases.items():
        err = errors.error_for(code, "ctx")
        assert isinstance(err, errors.ScoringError)
        assert isinstance(err, builtin)
        assert err.code == code
        assert str(err).startswith("ctx: ")
    assert type(errors.error_for(-999)) is errors.ScoringError
    assert errors.check(0) == 0 and errors.check(5) == 5
    with pytest.raises(errors.NotFoundError):
        errors.check(lib.OMNI_ENOTFOUND)


# ---- benchmark function -----------------------------------------------------------

def test_bench_bodies_are_valid_and_bench_runs():
    from omni_ctl.bench.lib_json import bench_json, format_json_bench, make_bodies
    bodies = make_bodies()
    for name, body in bodies.items():
        assert 190_000 <= len(body) <= 200_000, name
        assert py_valid(body), name
    assert isinstance(py_loads(bodies["tokens"])["prompt"][0], Decimal)
    small = {k: b'{"prompt": [1, 2, 3], "stream": true, "max_tokens": 5}'
             for k in bodies}
    result = bench_json(0.001, bodies=small)
    assert set(result) == set(bodies)
    for entry in result.values():
        assert {"scan", "scan_plan", "scan_apply"} <= set(entry)
        assert all(r["best"] >= r["median"] > 0 for k, r in entry.items() if k != "bytes")
    assert "scan_u32" in result["tokens"]
    assert len(format_json_bench(result)) == sum(len(e) - 1 for e in result.values())
