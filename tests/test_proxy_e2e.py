"""End to end: a real nginx with our module (2 workers, pinned) in front of
the simulated cluster (`omni-ctl sim`, real HTTP on loopback), in all three
P/D modes, streaming and not, with the official `openai` client as one of
the clients.

What is checked: the answers are right (token counts, SSE framing, usage),
both legs reach the instances the proxy says it chose (the simulator records
every request with its X-Request-Id, the proxy's access log records the
chosen addresses), one request id on both legs, SSE events arrive one by one,
and afterwards no instance has anything in flight.
"""

import http.client
import json
import time
import urllib.request

import pytest

from omni_ctl.sim.cluster import SimCluster

pytestmark = pytest.mark.timeout(180)

MODES = {
    # mode: (simulator engine, prefill instances, decode instances, both)
    "sequential": ("vllm", 2, 2, 0),
    "parallel": ("sglang", 2, 2, 0),
    "aggregated": ("vllm", 0, 0, 2),
}


@pytest.fixture(scope="module", params=list(MODES))
def cluster(request):
    mode = request.param
    engine, p, d, both = MODES[mode]
    # speedup < 1 slows the tiny preset's 2 ms steps down to 10 ms, so a
    # stream is long enough to see its events arrive apart
    with SimCluster(prefill=p, decode=d, both=both, engine=engine,
                    preset="tiny", args=["--speedup", "0.2"]) as sim:
        yield mode, sim


@pytest.fixture(params=["omni", "least-loaded"])
def proxy(cluster, omni_nginx, tmp_path, request):
    """The proxy with the holding scheduler (omni) and without it."""
    mode, sim = cluster
    options = dict(pd_policy=mode, schedule_policy=request.param,
                   access_log_file=str(tmp_path / "access.log"))
    # the simulator lists role-"both" instances with the decode endpoints
    options["decode_endpoints"] = ",".join(sim.decode_endpoints)
    if mode != "aggregated":
        options["prefill_endpoints"] = ",".join(sim.prefill_endpoints)
    nginx = omni_nginx(**options)
    yield mode, sim, nginx
    _assert_idle(nginx)


def _assert_idle(nginx, timeout=10.0):
    """Every instance back to zero requests and tokens in flight."""
    deadline = time.monotonic() + timeout
    while True:
        status = nginx.status()
        busy = [(i["address"], i["inflight_requests"], i["inflight_tokens"])
                for i in status["instances"]
                if i["inflight_requests"] or i["inflight_tokens"]]
        if not busy and status["totals"]["inflight_requests"] == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"still in flight after {timeout}s: {busy} {status['totals']}")
        time.sleep(0.05)


def _sim_requests(sim, rid):
    """(instance url, kind) of every engine request the simulator saw with
    this X-Request-Id."""
    stats = sim.stats(requests=200)
    seen = []
    for inst in stats["cluster"]:
        for req in inst.get("requests", []):
            if req.get("x_request_id") == rid:
                seen.append((inst["url"], inst["role"], req.get("kind")))
    return seen


def _access_line(tmp_path, rid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = tmp_path / "access.log"
        if path.exists():
            for line in path.read_text().splitlines():
                if rid in line:
                    return line
        time.sleep(0.05)
    pytest.fail(f"no access log line for {rid}")


def _field(line, name):
    for part in line.split():
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    return None


def _stream(nginx, path, body, headers=None):
    """POST and read SSE events as they arrive: [(arrival time, data)]."""
    req = urllib.request.Request(nginx.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **(headers or {})})
    events = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        rid = (resp.headers["X-Request-Id"], resp.headers["X-Omni-Request-Id"])
        buf = b""
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                assert event.startswith(b"data: "), event
                events.append((time.monotonic(), event[6:].decode()))
    assert buf == b"", f"trailing bytes after the last event: {buf!r}"
    return rid, events


@pytest.mark.parametrize("stream", [False, True])
def test_completion_answer_and_legs(proxy, tmp_path, stream):
    mode, sim, nginx = proxy
    body = {"model": "sim-model", "prompt": "The quick brown fox " * 20,
            "max_tokens": 12, "ignore_eos": True, "stream": stream}
    rid_in = f"e2e-{mode}-{int(stream)}-{time.monotonic_ns()}"

    if stream:
        body["stream_options"] = {"include_usage": True}
        rid, events = _stream(nginx, "/v1/completions", body, {"X-Request-Id": rid_in})
        assert events[-1][1] == "[DONE]"
        chunks = [json.loads(e) for _, e in events[:-1]]
        usage = [c for c in chunks if c.get("usage")]
        assert usage and usage[-1]["usage"]["completion_tokens"] == 12
        assert usage[-1]["choices"] == []
        text_chunks = [c for c in chunks if c.get("choices")]
        assert text_chunks, "no token chunks"
    else:
        resp = nginx.post("/v1/completions", json=body, headers={"X-Request-Id": rid_in})
        assert resp.status == 200, resp.text
        rid = (resp.headers["x-request-id"], resp.headers["x-omni-request-id"])
        answer = resp.json()
        assert answer["usage"]["completion_tokens"] == 12
        assert answer["choices"][0]["finish_reason"] == "length"

    # the client's id comes back; the engines saw the proxy's own id
    rid, engine_rid = rid
    assert rid == rid_in and engine_rid != rid_in

    # the simulator saw the proxy's request id on each leg, on the instances
    # the proxy logged as its choices
    line = _access_line(tmp_path, rid)
    assert _field(line, "id") == engine_rid and _field(line, "client_id") == rid_in
    seen = _sim_requests(sim, engine_rid)
    roles = sorted(role for _, role, _ in seen)
    prefill_addr, decode_addr = _field(line, "prefill"), _field(line, "decode")
    if mode == "aggregated":
        assert roles == ["both"], seen
        assert seen[0][0].endswith(decode_addr), (seen, line)
    else:
        assert roles == ["decode", "prefill"], seen
        by_role = {role: url for url, role, _ in seen}
        assert by_role["prefill"].endswith(prefill_addr), (seen, line)
        assert by_role["decode"].endswith(decode_addr), (seen, line)


def test_sse_events_arrive_one_by_one(proxy):
    """The first token reaches the client long before the stream ends:
    nothing buffers the decode leg."""
    mode, sim, nginx = proxy
    body = {"prompt": "stream me", "max_tokens": 30, "ignore_eos": True, "stream": True}
    _, events = _stream(nginx, "/v1/completions", body)
    tokens = [t for t, e in events if e != "[DONE]"]
    assert len(tokens) >= 10
    # 30 decode steps of ~10 ms each: the first event is seen while at
    # least half of them are still to come
    assert events[-1][0] - tokens[0] > 0.1, [round(t - tokens[0], 3) for t, _ in events]


def test_chat_with_openai_client(proxy):
    openai = pytest.importorskip("openai")
    mode, sim, nginx = proxy
    client = openai.OpenAI(base_url=nginx.url + "/v1", api_key="none", max_retries=0,
                           timeout=30)
    reply = client.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "hello there"}],
        max_tokens=5, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 5

    stream = client.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "stream please"}],
        max_tokens=6, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content
    assert chunks[-1].usage.completion_tokens == 6


def test_token_id_prompt_and_batch(proxy):
    mode, sim, nginx = proxy
    resp = nginx.post("/v1/completions", json={"prompt": list(range(100, 164)),
                                               "max_tokens": 3, "ignore_eos": True})
    assert resp.status == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == 64

    resp = nginx.post("/v1/completions", json={"prompt": ["first prompt", "second one"],
                                               "max_tokens": 2, "ignore_eos": True})
    if mode == "sequential":
        # kv_transfer_params describe one request: the proxy says so itself
        assert resp.status == 400, resp.text
        assert "one prompt per request" in resp.json()["error"]["message"]
    else:
        assert resp.status == 200, resp.text
        assert len(resp.json()["choices"]) == 2


@pytest.mark.parametrize("pieces, pad", [(5, 0), (1, 1_200_000)],
                         ids=["in-pieces", "temp-file"])
def test_body_read_in_pieces_or_from_a_temp_file(proxy, pieces, pad):
    """The proxy joins the body nginx read: a client that sends it in
    pieces (several reads, part of it with the header), and one larger than
    client_body_buffer_size (nginx keeps it in a temp file).  The engine must
    get it whole: it counts the prompt's tokens, and the padding (an unknown
    field, passed through) makes the body that large."""
    mode, sim, nginx = proxy
    ids = list(range(300, 364))
    body = json.dumps({"prompt": ids, "max_tokens": 2, "ignore_eos": True,
                       "pad": "x" * pad}).encode()
    conn = http.client.HTTPConnection(nginx.host, nginx.port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        # the first piece goes out with the header
        size = -(-len(body) // pieces)
        conn.endheaders(body[:size])
        for k in range(size, len(body), size):
            time.sleep(0.05)
            conn.send(body[k:k + size])
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200, answer
    assert answer["usage"]["prompt_tokens"] == len(ids)
    assert answer["usage"]["completion_tokens"] == 2


def test_finished_in_prefill(proxy):
    """vLLM returns no kv_transfer_params when the request ended inside
    prefill (EOS at once): the client still gets a correct answer, in the
    form it asked for."""
    mode, sim, nginx = proxy
    if mode != "sequential":
        pytest.skip("a sequential-mode protocol detail")
    body = {"prompt": "short answer", "max_tokens": 8, "sim_eos_at": 1}

    resp = nginx.post("/v1/completions", json=body)
    assert resp.status == 200, resp.text
    answer = resp.json()
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == 1

    rid, events = _stream(nginx, "/v1/completions",
                          {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(e) for _, e in events[:-1]]
    assert chunks[0]["object"] == "text_completion"
    assert chunks[0]["choices"][0]["finish_reason"] == "stop"
    assert chunks[0]["choices"][0]["text"] == answer["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 1
    # no decode leg was sent
    assert [role for _, role, _ in _sim_requests(sim, rid[1])] == ["prefill"]


def test_other_paths_and_health(proxy):
    mode, sim, nginx = proxy
    models = nginx.get("/v1/models")
    assert models.status == 200 and models.json()["data"]
    health = nginx.get("/health")
    assert health.status == 200
    assert health.json()["status"] == "ok"
    metrics = nginx.get("/metrics")
    assert metrics.status == 200
    assert b"omni_requests_total" in metrics.body
