"""Hostile input through a real nginx with our module: each gets one
well-formed answer (an OpenAI-style JSON error with the reason, or, for a
client too slow to send its request, a closed connection), none reaches an
engine, and the proxy's counters are back at zero afterwards.

The engines are the simulator (1 prefill + 1 decode, vLLM protocol,
sequential P/D); what the engines received is read from /sim/stats."""

import json
import socket
import time

import pytest

from omni_ctl.sim.cluster import SimCluster

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def sim():
    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny") as cluster:
        yield cluster


@pytest.fixture
def proxy(omni_nginx, sim):
    return omni_nginx(prefill_endpoints=",".join(sim.prefill_endpoints),
                      decode_endpoints=",".join(sim.decode_endpoints),
                      max_body_size="64k")


def _engine_requests(sim):
    return sum(i["requests_total"] for i in sim.stats()["cluster"])


def _idle(nginx, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        st = nginx.status()
        busy = [i for i in st["instances"] if i["inflight_requests"]
                or i["inflight_tokens"] or i.get("prefilling")]
        if not busy and st["totals"]["inflight_requests"] == 0 \
                and st["queues"]["prefill_waiting"] == 0 \
                and st["queues"]["decode_waiting"] == 0:
            return st
        assert time.monotonic() < deadline, f"load left behind: {busy} {st['totals']}"
        time.sleep(0.05)


def _raw(nginx, data: bytes, timeout=10.0) -> bytes:
    """Send raw bytes, read the whole answer (the proxy closes or answers)."""
    with socket.create_connection((nginx.host, nginx.port), timeout=timeout) as s:
        s.sendall(data)     # Connection: close: the proxy closes after its answer
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def _post(path: str, body: bytes, extra_headers: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n" + extra_headers
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _one_json_error(answer: bytes, status: int | tuple) -> dict:
    """Exactly one HTTP response, with an OpenAI-style JSON error body."""
    assert answer.count(b"HTTP/1.1 ") == 1, answer[:500]
    head, _, body = answer.partition(b"\r\n\r\n")
    code = int(head.split(b" ", 2)[1])
    assert code in (status if isinstance(status, tuple) else (status,)), answer[:500]
    assert b"application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert err["code"] == code
    return err


DEEP = 10000
HOSTILE = [
    # (name, body, what the reason must mention)
    ("truncated", b'{"prompt": "abc", "max_tokens": 4', "JSON"),
    ("trailing garbage", b'{"prompt": "abc"} {"prompt": "x"}', "JSON"),
    ("double comma", b'{"prompt": "abc",, "max_tokens": 4}', "JSON"),
    ("bare string", b'"prompt"', "object"),
    ("deep nesting", b'{"prompt": "x", "metadata": ' + b"[" * DEEP + b"]" * DEEP + b"}",
     "deep"),
    ("deep object nesting", b'{"prompt": "x", "m": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP
     + b"}", "deep"),
    ("huge max_tokens", b'{"prompt": "x", "max_tokens": 99999999999999999999999999}',
     "max_tokens"),
    ("float max_tokens", b'{"prompt": "x", "max_tokens": 1e400}', "max_tokens"),
    ("huge token id", b'{"prompt": [1, 99999999999999999999999]}', "token"),
    ("invalid utf-8", b'{"prompt": "\xc3\x28 and \xed\xa0\x80"}', "JSON"),
    ("lone surrogate escape", b'{"prompt": "\\ud800"}', None),
    ("duplicate prompt", b'{"prompt": "a", "prompt": "b", "max_tokens": 2}', "duplicate"),
    ("duplicate stream", b'{"prompt": "a", "stream": false, "stream": true}', "duplicate"),
    ("escaped duplicate stream", b'{"prompt": "a", "\\u0073tream": false, "stream": true}',
     "duplicate"),
    # two keys repeated: the error names the first of the proxy's key list
    ("two duplicates", b'{"stream": true, "stream": true, "prompt": "a", "prompt": "b"}',
     'duplicate key "prompt"'),
    ("stream not bool", b'{"prompt": "a", "stream": 1}', "stream"),
    ("max_tokens bool", b'{"prompt": "a", "max_tokens": true}', "max_tokens"),
    ("messages not list", b'{"messages": {"role": "user"}}', "messages"),
    ("prompt null", b'{"prompt": null}', "prompt"),
    ("nul byte", b'{"prompt": "a\x00b"}', "JSON"),
]


@pytest.mark.parametrize("name, body, mention", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_one_well_formed_400(proxy, sim, name, body, mention):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    before = _engine_requests(sim)
    answer = _raw(proxy, _post(path, body))
    if name == "lone surrogate escape":
        # valid JSON (a lone surrogate escape is allowed by the grammar): the
        # proxy passes it on or refuses it, but answers once, well-formed
        assert answer.count(b"HTTP/1.1 ") == 1, answer[:300]
        _idle(proxy)
        return
    err = _one_json_error(answer, 400)
    assert mention.lower() in err["message"].lower(), err
    assert _engine_requests(sim) == before, "a hostile body reached an engine"
    _idle(proxy)


def test_oversize_body_and_headers(proxy, sim):
    before = _engine_requests(sim)
    big = json.dumps({"prompt": "x" * (80 * 1024)}).encode()
    _one_json_error(_raw(proxy, _post("/v1/completions", big)), 413)
    # announced too large: refused before the body is read
    _one_json_error(_raw(proxy, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 999999999\r\n\r\n"), 413)
    huge_header = b"X-Junk: " + b"a" * (64 * 1024) + b"\r\n"
    _one_json_error(_raw(proxy, _post("/v1/completions", b'{"prompt": "x"}', huge_header)),
                    (400, 431, 494))
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    _one_json_error(_raw(proxy, _post("/v1/completions", b'{"prompt": "x"}', many)),
                    (400, 431, 494))
    assert _engine_requests(sim) == before
    _idle(proxy)


def test_slow_client_is_cut_off_and_leaves_nothing(omni_nginx, sim):
    """A client that sends its header and then its body a byte at a time,
    slower than the body timeout, is answered once (408) or closed; the
    proxy holds nothing for it afterwards."""
    nginx = omni_nginx(prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=",".join(sim.decode_endpoints),
                       client_body_timeout="1s")
    before = _engine_requests(sim)
    body = b'{"prompt": "slow", "max_tokens": 2}'
    with socket.create_connection((nginx.host, nginx.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body[:3])
        time.sleep(3)           # past the body timeout, on purpose
        out = b""
        s.settimeout(10)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    assert out == b"" or out.count(b"HTTP/1.1 ") == 1 and b" 408 " in out.split(b"\r\n")[0]
    assert _engine_requests(sim) == before
    _idle(nginx)
