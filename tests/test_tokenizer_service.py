"""`omni-ctl tokenizer` really started (control.start -> a pre-forked
server on a unix socket), spoken to over HTTP/1.1 as nginx will."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import wait_until
from omni_ctl.tokenizer import control, wire
from tokmodel import hf_tok, model_dir  # noqa: F401 (fixtures)
from test_tokenizer import CORPUS, SYSTEM, ref_chat, ref_encode


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):  # noqa: F811
    prefix = tmp_path_factory.mktemp("tokprefix")
    svc = control.Service.in_prefix(prefix, model_dir, workers=2,
                                    extra=("--verify-reuse", "1"))
    control.start(svc, timeout=120)
    yield svc
    control.stop(svc)


def post(svc, route, body):
    return control.request(svc.socket, "POST", route, json.dumps(body).encode())


def http_on(sock, requests):
    """Send raw requests on one connection, read one answer per request."""
    answers = []
    f = sock.makefile("rb")
    for req in requests:
        sock.sendall(req)
        status = f.readline().split()[1]
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        answers.append((int(status), headers, f.read(int(headers["content-length"]))))
    return answers


def test_completions_and_chat_over_the_socket(service, hf_tok):  # noqa: F811
    status, ctype, body = post(service, "/v1/completions", {"prompt": CORPUS})
    assert status == 200 and ctype == wire.CONTENT_TYPE
    flags, _, prompts = wire.decode(body)
    assert flags == 0
    assert prompts == [ref_encode(hf_tok, t) for t in CORPUS]

    msgs = [SYSTEM, {"role": "user", "content": "hello 世界"}]
    status, _, body = post(service, "/v1/chat/completions", {"messages": msgs})
    flags, _, prompts = wire.decode(body)
    assert status == 200 and prompts == [ref_chat(hf_tok, msgs)]
    assert flags == wire.FLAG_CHAT | wire.FLAG_SGLANG_SAFE


def test_ids_given_errors_and_unknown_routes(service):
    status, _, body = post(service, "/v1/completions", {"prompt": [[1, 2], [3]]})
    assert status == 200 and wire.decode(body) == (wire.FLAG_IDS_GIVEN, 0, [])
    status, ctype, body = post(service, "/v1/chat/completions",
                               {"messages": [{"role": "wizard", "content": "x"}]})
    err = json.loads(body)["error"]
    assert status == 400 and ctype == "application/json"
    assert err["code"] == 400 and "Unknown role: wizard" in err["message"]
    status, _, body = control.request(service.socket, "POST", "/v1/completions",
                                      b"{not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    status, _, body = post(service, "/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]})
    assert status == 422
    assert control.request(service.socket, "POST", "/v1/embeddings", b"{}")[0] == 404
    assert control.request(service.socket, "GET", "/v1/completions")[0] == 405


def test_keep_alive_and_chunked_bodies(service, hf_tok):  # noqa: F811
    body = json.dumps({"prompt": "keep me alive"}).encode()
    plain = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: "
             + str(len(body)).encode() + b"\r\n\r\n" + body)
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:5], body[5:]))
               + b"0\r\n\r\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(service.socket))
        answers = http_on(s, [plain, chunked, plain])
    want = [ref_encode(hf_tok, "keep me alive")]
    for status, headers, data in answers:
        assert status == 200 and headers["connection"] == "keep-alive"
        assert wire.decode(data)[2] == want


def test_multi_turn_reuse_through_the_service(service, hf_tok):  # noqa: F811
    # one connection: one worker, so its cache sees every turn
    msgs = [SYSTEM, {"role": "user", "content": "turn 0"}]
    conn = control._UnixHTTP(service.socket, 30)
    reused = []
    try:
        for t in range(1, 5):
            conn.request("POST", "/v1/chat/completions", json.dumps({"messages": msgs}))
            r = conn.getresponse()
            flags, n, prompts = wire.decode(r.read())
            assert prompts == [ref_chat(hf_tok, msgs)]
            reused.append(n if flags & wire.FLAG_REUSED else 0)
            msgs = msgs + [{"role": "assistant", "content": f"answer {t}"},
                           {"role": "user", "content": f"turn {t}"}]
        conn.request("GET", "/stats")
        stats = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert all(n > 0 for n in reused[1:]), reused
    assert stats["reuse_verified"] >= 3 and stats["reuse_mismatches"] == 0


def test_a_killed_worker_is_replaced(service):
    pid = control.running_pid(service)
    before = wait_until(lambda: len(control.worker_pids(pid)) == 2 and control.worker_pids(pid), timeout=30, what="2 workers")
    os.kill(before[0], signal.SIGKILL)
    wait_until(lambda: len(control.worker_pids(pid)) == 2 and before[0] not in control.worker_pids(pid),
               timeout=30, what="a new worker")
    assert control.ready(service.socket)


def test_start_stop_and_a_stale_pid_file(model_dir, tmp_path):  # noqa: F811
    svc = control.Service.in_prefix(tmp_path, model_dir, workers=1)
    # a pid file naming another process (ours) is never signalled
    svc.pid_file.write_text(f"{os.getpid()}\n")
    assert control.running_pid(svc) is None
    assert control.stop(svc) is None
    pid = control.start(svc, timeout=120)
    assert control.running_pid(svc) == pid and control.ready(svc.socket)
    assert control.start(svc) == pid            # already running: same one
    assert control.stop(svc) == pid
    assert not svc.socket.exists() and not svc.pid_file.exists()
    assert not control.is_service(pid, svc.socket)


def test_a_live_socket_is_not_taken_over(model_dir, tmp_path):  # noqa: F811
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        svc = control.Service(str(model_dir), path, tmp_path / "t.pid",
                              tmp_path / "t.log", workers=1)
        with pytest.raises(control.TokenizerCtlError, match="another process"):
            control.start(svc, timeout=120)


def test_cli_lists_the_command():
    out = subprocess.run([sys.executable, "-m", "omni_ctl.cli", "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "tokenizer" in out


def test_worker_sockets_keep_a_conversation_on_one_cache(model_dir, tmp_path, hf_tok):  # noqa: F811
    svc = control.Service.in_prefix(tmp_path, model_dir, workers=2,
                                    extra=("--worker-sockets",))
    control.start(svc, timeout=120)
    try:
        own = [svc.socket.with_name(svc.socket.name + f".{i}") for i in range(2)]
        pids = {json.loads(control.request(p, "GET", "/stats")[2])["pid"] for p in own}
        assert pids == set(control.worker_pids(control.running_pid(svc)))
        # a new connection per turn, always to worker 1: every later turn reuses
        msgs = [SYSTEM, {"role": "user", "content": "turn 0"}]
        for t in range(1, 4):
            status, _, body = post_to(own[1], {"messages": msgs})
            flags, reused, prompts = wire.decode(body)
            assert status == 200 and prompts == [ref_chat(hf_tok, msgs)]
            assert (reused > 0) == (t > 1)
            msgs = msgs + [{"role": "assistant", "content": f"a{t}"},
                           {"role": "user", "content": f"turn {t}"}]
    finally:
        control.stop(svc)
    assert not any(p.exists() for p in own) and not svc.socket.exists()


def post_to(path, body):
    return control.request(path, "POST", "/v1/chat/completions", json.dumps(body).encode())


def test_no_reuse_cache_option(model_dir, tmp_path, hf_tok):  # noqa: F811
    svc = control.Service.in_prefix(tmp_path, model_dir, workers=1,
                                    extra=("--no-reuse-cache",))
    control.start(svc, timeout=120)
    try:
        msgs = [SYSTEM, {"role": "user", "content": "q"}]
        for _ in range(2):
            status, _, body = post(svc, "/v1/chat/completions", {"messages": msgs})
            flags, reused, prompts = wire.decode(body)
            assert prompts == [ref_chat(hf_tok, msgs)] and reused == 0
            assert not flags & wire.FLAG_REUSED
            msgs = msgs + [{"role": "assistant", "content": "a"},
                           {"role": "user", "content": "q"}]
    finally:
        control.stop(svc)


@pytest.fixture
def one_worker(model_dir, tmp_path):  # noqa: F811
    """A service of one worker, and its /stats."""
    svc = control.Service.in_prefix(tmp_path, model_dir, workers=1)
    control.start(svc, timeout=120)
    try:
        yield svc, lambda: json.loads(control.request(svc.socket, "GET", "/stats")[2])
    finally:
        control.stop(svc)


def test_reuse_0_tokenizes_whole_and_leaves_the_cache_alone(one_worker, hf_tok):  # noqa: F811
    # the paired bench's side without the cache, in a worker that has one:
    # the same ids, nothing read from or put in the cache, timed apart
    svc, stats = one_worker
    msgs = [SYSTEM, {"role": "user", "content": "first question"}]
    longer = msgs + [{"role": "assistant", "content": "an answer"},
                     {"role": "user", "content": "second question"}]
    before = stats()
    for m in (msgs, longer):
        status, _, body = post(svc, "/v1/chat/completions?reuse=0", {"messages": m})
        flags, reused, prompts = wire.decode(body)
        assert status == 200 and prompts == [ref_chat(hf_tok, m)] and reused == 0
        assert not flags & wire.FLAG_REUSED
    mid = stats()
    assert mid["cache_entries"] == before["cache_entries"] == 0
    assert mid["noreuse_requests"] == 2 and mid["requests"] == 2
    assert mid["noreuse_busy_s"] > 0 and mid["busy_s"] == 0
    # the cache works as before for the same conversation without the flag
    for t, m in enumerate((msgs, longer)):
        status, _, body = post(svc, "/v1/chat/completions", {"messages": m})
        flags, reused, prompts = wire.decode(body)
        assert prompts == [ref_chat(hf_tok, m)] and (reused > 0) == (t == 1)
    after = stats()
    assert after["noreuse_requests"] == 2 and after["busy_s"] > 0
    # a completion prompt too; a chat request gets no learning handle
    status, _, body = post(svc, "/v1/completions?reuse=0", {"prompt": CORPUS[:2]})
    flags, reused, prompts = wire.decode(body)
    assert prompts == [ref_encode(hf_tok, t) for t in CORPUS[:2]] and reused == 0
    status, _, body = post(svc, "/v1/chat/completions?learn=1", {"messages": longer})
    assert status == 200 and wire.handle_of(body)
    status, _, body = post(svc, "/v1/chat/completions?reuse=0&learn=1",
                           {"messages": longer})
    assert status == 200 and not wire.handle_of(body)
    assert stats()["handles"] == after["handles"] + 1


def test_a_request_whose_client_has_gone_is_not_tokenized(one_worker, hf_tok):  # noqa: F811
    # nginx closes the connection when its deadline passes; a worker that
    # still tokenized such requests would spend its time on answers nobody
    # reads while the fresh ones behind them miss their deadline too (the
    # overload that never ends).  Mechanism, not timing: the worker is
    # stopped while one client sends and hangs up, another sends and waits.
    svc, stats = one_worker
    before = stats()
    body = json.dumps({"prompt": "hello there"}).encode()
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: "
           + str(len(body)).encode() + b"\r\n\r\n" + body)
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.kill(before["pid"], signal.SIGSTOP)
    try:
        gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        gone.connect(str(svc.socket))
        gone.sendall(req)
        gone.close()
        # only its sending side shut: it still reads the answer
        half.connect(str(svc.socket))
        half.sendall(req)
        half.shutdown(socket.SHUT_WR)
    finally:
        os.kill(before["pid"], signal.SIGCONT)
    half.settimeout(30)
    answer = b""
    while chunk := half.recv(65536):
        answer += chunk
    half.close()
    head, _, data = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert wire.decode(data)[2] == [ref_encode(hf_tok, "hello there")]
    after = stats()
    assert after["abandoned"] == before["abandoned"] + 1
    assert after["requests"] == before["requests"] + 1


def test_a_directory_without_a_tokenizer_fails_to_start(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    svc = control.Service.in_prefix(tmp_path / "p", empty, workers=1)
    with pytest.raises(control.TokenizerCtlError, match="cannot load a tokenizer"):
        control.start(svc, timeout=120)
    assert not svc.socket.exists()


def test_the_in_process_bench_counts_only_the_measured_conversations(model_dir):  # noqa: F811
    # shape only: the warm-up's conversations are left out of the stats
    # when timed, and run not at all when counted (callgrind)
    from omni_ctl.tokenizer import bench

    timed = bench.in_process(model_dir, "learn", conversations=1, turns=2)
    assert timed["requests"] == 2 and timed["learned"] == 2 and timed["busy_s"] > 0
    counted = bench.in_process(model_dir, "on", count="request", conversations=1, turns=2)
    assert counted["requests"] == 2 and counted["reused_tokens"] > 0
    assert counted["tokens"] == timed["tokens"]


def test_the_micro_benchmark_runs(model_dir):  # noqa: F811
    # shape only (no timing assertions): every measurement is there and ran
    from omni_ctl.tokenizer import bench

    results = bench.run(model_dir, requests=2, max_seconds=20, conversations=1, turns=2,
                        emit=lambda line: None)
    names = [(r["name"], r.get("kb"), r.get("reuse")) for r in results]
    assert names == [(n, kb, None) for kb in bench.SIZES_KB
                     for n in ("service", "transformers")] + \
        [("multi-turn", None, "on"), ("multi-turn", None, "learn"),
         ("multi-turn", None, "off"), ("multi-turn paired", None, None),
         ("multi-turn paired", None, None)]
    by_conv = results.pop()
    by_turn = results.pop()
    assert (by_turn["by"], by_conv["by"]) == ("turn", "conversation")
    assert all(r["n"] >= 1 and r["p99_ms"] >= r["p50_ms"] > 0 for r in results)
    on, learn, off = results[-3:]
    # paired in one worker, by turn and by conversation: both turns of the
    # conversation went whole and with the cache, each side timed apart,
    # and the order does not change what the cache gave
    for paired in (by_turn, by_conv):
        assert paired["n"] == 2 and paired["learned"] == 2
        assert paired["reused_tokens"] == by_turn["reused_tokens"] > 0
        assert paired["whole_ms"] > 0 and paired["cached_ms"] > 0
        assert paired["ratio"] == pytest.approx(paired["whole_ms"] / paired["cached_ms"])
    # learning: the answer was learned (and cost time apart from requests)
    assert learn["learned"] == 2 and learn["learn_cpu_ms"] > 0
    assert learn["learn_encoded_tokens"] > 0 and on["learned"] == 0
    assert learn["tokens"] == on["tokens"]
    assert learn["reused_tokens"] > on["reused_tokens"]
    # the service's own time is counted, and the second turn came from the
    # cache only with it
    assert on["service_ms"] > 0 and off["service_ms"] > 0 and on["service_cpu_ms"] > 0
    assert on["tokens"] == off["tokens"] > 0
    assert on["reused_tokens"] > 0 and off["reused_tokens"] == 0
