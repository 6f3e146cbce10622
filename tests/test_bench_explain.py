"""`omni-ctl explain` on synthetic run directories whose attribution is known
by hand. A real run (simulator + proxy): tests/test_bench_explain_run.py."""

import json
import subprocess
import sys

import pytest

from omni_ctl.bench import explain as ex
from omni_ctl.bench.errors import BenchError

T0 = 1796400000.0
P0, P1 = "127.0.0.1:1000", "127.0.0.1:1001"


def write_run(root, reqs, slack=20, starve=2000, status_starved=None, mode="sequential"):
    """A run directory as `compare` leaves it. reqs: dicts with the proxy's
    arrive/queue/leg in ms, the instance, the client's ttft, and optionally
    the simulator's prefill (queue, ttft, prompt, hit) and decode ttft."""
    d = root / "omni"
    (d / "run").mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"config": {"run_id": "t"}}))
    (d / "run" / "nginx.conf").write_text(
        f"http {{\n    omni_prefill_starvation_timeout {starve}ms;\n"
        f"    omni_hold_slack {slack}ms;\n}}\n")
    lines, client, pre, dec = [], [], [], []
    for i, r in enumerate(reqs):
        end = r["arrive"] + r["ttft"] + 40          # the stream ends later
        legs = (f'prefill={r["inst"]} decode=127.0.0.1:2000 ' if mode != "aggregated"
                else f'prefill=- decode={r["inst"]} ')
        proxy_ttft = r["ttft"] - 1 if mode != "aggregated" else r["queue"] + r["leg"]
        lines.append(
            f'127.0.0.1 [x] "POST /v1/completions HTTP/1.1" 200 9 0.1 id=t-{i} '
            f'mode={mode} {legs}'
            f'prompt_tokens={r.get("prompt", 1000)} cached_tokens={r.get("index_hit", 0)} '
            f'queue_ms={r["queue"]} '
            f'prefill_ms={r["leg"] if mode != "aggregated" else "-"} '
            f'prefill_pred_ms={r["leg"]} {r.get("log", "")} '
            f'ttft_ms={proxy_ttft} total_ms={end - r["arrive"]} error=- '
            f't={(T0 * 1000 + end) / 1000:.3f}')
        client.append({"index": i, "ok": True, "ttft_ms": r["ttft"],
                       "start_s": r["arrive"] / 1000.0})
        if "engine_queue" in r:
            pre.append({"x_request_id": f"t-{i}",
                        "kind": "bootstrap" if mode == "parallel" else "kv_producer",
                        "prompt_tokens": r.get("prompt", 1000),
                        "cached_tokens": r.get("engine_hit", 0),
                        "queue_s": r["engine_queue"] / 1000.0,
                        "ttft_s": r["engine_ttft"] / 1000.0,
                        "tokenize_s": r.get("tokenize", 0) / 1000.0,
                        **({"arrival_unix": T0 + (r["arrive"] + r["queue"] + r["hop"]) / 1000.0}
                           if "hop" in r else {})})
            dec.append({"x_request_id": f"t-{i}", "kind": "kv_consumer",
                        "prompt_tokens": r.get("prompt", 1000), "cached_tokens": 0,
                        "queue_s": 0.0, "ttft_s": r["decode"] / 1000.0,
                        "tokenize_s": r.get("tokenize_decode", 0) / 1000.0})
    lines.insert(1, '127.0.0.1 [x] "GET /health HTTP/1.1" 200 1 0.0 id=- mode=- '
                    'prefill=- queue_ms=- prefill_ms=- total_ms=- error=- t=1.0')
    (d / "run" / "access.log").write_text("\n".join(lines) + "\n")
    (d / "requests.jsonl").write_text("".join(json.dumps(c) + "\n" for c in client))
    inst = lambda name, role, url, recs: {  # noqa: E731
        "name": name, "role": role, "engine": "vllm", "url": "http://" + url,
        "preset": "tiny", "speedup": 1.0, "requests": recs}
    if pre:
        (d / "sim_requests.json").write_text(json.dumps({"instances": [
            inst("prefill-0", "prefill", P0, pre), inst("prefill-1", "prefill", P1, []),
            inst("decode-0", "decode", "127.0.0.1:2000", dec)]}))
    if status_starved is not None:
        (d / "omni_status.json").write_text(json.dumps(
            {"queues": {"released_by_starvation_timeout": status_starved}}))
    return d


def causes(res, i):
    return next(r["causes_ms"] for r in res["requests"] if r["index"] == i)


def test_held_time_split_into_busy_idle_and_the_leg_into_engine_causes(tmp_path):
    # P0 busy 0-1000, P1 busy 0-500. Request 2 arrives at 100 and is held to
    # 700: 400 ms with both busy, 200 ms with P1 idle. In the engine it waits
    # 30 ms (20 within the hold slack, 10 beyond) and its prefill takes 60 ms
    # where alone it takes 4 (tiny preset: 2 ms + 2 us x 1000 tokens); the leg
    # is 100 ms of which the engine accounts for 90; the decode engine takes
    # 50; the client sees 755 ms
    d = write_run(tmp_path, [
        dict(arrive=0, queue=0, leg=1000, inst=P0, ttft=1100),
        dict(arrive=0, queue=0, leg=500, inst=P1, ttft=600),
        dict(arrive=100, queue=600, leg=100, inst=P1, ttft=755, engine_queue=30,
             engine_ttft=90, decode=50)])
    res = ex.explain(str(d))
    c = causes(res, 2)
    want = {"wait": 420, "idle": 200, "starved": 0, "mispredict": 10, "shared": 56,
            "prefill": 4, "decode": 50, "tokenize": 0, "overhead": 15}
    assert c == pytest.approx(want, abs=0.01)
    assert sum(c.values()) == pytest.approx(755, abs=0.01)
    # without the simulator's records the leg stays whole and so does the rest
    assert causes(res, 0)["prefill"] == 1000 and causes(res, 0)["decode"] == 100
    assert "| idle instance |" in res["markdown"] and "$omni_release_reason" in res["markdown"]


def test_handovers_count_the_idle_between_two_prefills_with_the_next_one_waiting(tmp_path):
    # one prefill instance: request 0 runs 0-500 in the engine; request 1
    # reached the proxy at 100, was released at 505 and started in the
    # engine at 512 (a 12 ms handover); request 2 reached the proxy at 700,
    # after the instance had gone idle at 600: not a handover
    d = write_run(tmp_path, [
        dict(arrive=0, queue=0, hop=0, leg=500, inst=P0, ttft=560, engine_queue=0,
             engine_ttft=500, decode=50),
        dict(arrive=100, queue=405, hop=7, leg=100, inst=P0, ttft=560, engine_queue=0,
             engine_ttft=88, decode=50),
        dict(arrive=700, queue=0, hop=5, leg=60, inst=P0, ttft=120, engine_queue=0,
             engine_ttft=50, decode=50)])
    ho = ex.explain(str(d))["handovers"]
    assert ho["count"] == 1 and ho["instances"] == 1
    assert ho["total_s"] == pytest.approx(0.012, abs=1e-6)
    assert ho["median_ms"] == pytest.approx(12.0, abs=1e-3)
    assert ho["share"] == pytest.approx(0.012 / 0.755, rel=1e-3)     # of 0-755 ms
    assert "handovers: 1 times a prefill instance idled" in ex.explain(str(d))["markdown"]
    # without the simulator's records there is nothing to count
    d2 = write_run(tmp_path / "b", [dict(arrive=0, queue=0, leg=500, inst=P0, ttft=560)])
    assert ex.explain(str(d2))["handovers"] is None


def test_the_engines_tokenizing_is_its_own_cause(tmp_path):
    # a text prompt: the prefill engine's front end tokenized it for 6 ms
    # before its 90 ms (so the 100 ms leg has 4 ms of hops), the decode
    # engine's for 7 ms before its 50 ms; the client saw 170 ms, so 20 ms
    # passed between the legs and back. The 13 ms leave the overhead
    d = write_run(tmp_path, [
        dict(arrive=0, queue=0, leg=100, inst=P0, ttft=170, engine_queue=0,
             engine_ttft=90, decode=50, tokenize=6, tokenize_decode=7)])
    c = causes(ex.explain(str(d)), 0)
    assert c["tokenize"] == pytest.approx(13, abs=0.01)
    assert c["overhead"] == pytest.approx(10 + 20 - 13, abs=0.01)
    assert c["decode"] == 50
    assert sum(c.values()) == pytest.approx(170, abs=0.01)
    # in parallel P/D the decode leg's tokenizing overlaps the prefill
    d2 = write_run(tmp_path / "par", [
        dict(arrive=0, queue=0, leg=100, inst=P0, ttft=170, engine_queue=0,
             engine_ttft=90, decode=50, tokenize=6, tokenize_decode=7, hop=8)],
        mode="parallel")
    assert causes(ex.explain(str(d2)), 0)["tokenize"] == pytest.approx(6, abs=0.01)


def test_a_longer_request_released_by_the_starvation_timeout_ahead(tmp_path):
    # timeout 300 ms. P0 busy 0-2000, P1 0-400. Request 2 (5000 tokens)
    # arrives at 50 and is released at 400, past the timeout, onto P1 until
    # 1400; request 3 (100 tokens) arrives at 100 and waits until 1400: 300 ms
    # with both busy, then 1000 ms behind the longer, starved request
    d = write_run(tmp_path, [
        dict(arrive=0, queue=0, leg=2000, inst=P0, ttft=2050),
        dict(arrive=0, queue=0, leg=400, inst=P1, ttft=450),
        dict(arrive=50, queue=350, leg=1000, inst=P1, ttft=1400, prompt=5000),
        dict(arrive=100, queue=1300, leg=10, inst=P1, ttft=1320, prompt=100)],
        starve=300, status_starved=1)
    res = ex.explain(str(d))
    c = causes(res, 3)
    assert c["starved"] == pytest.approx(1000, abs=0.01)
    assert c["wait"] == pytest.approx(300, abs=0.01) and c["idle"] == pytest.approx(0)
    assert causes(res, 2)["starved"] == 0 and causes(res, 2)["wait"] == pytest.approx(350)
    assert res["released_by_starvation"] == 2      # both waited past 300 ms
    assert any("/omni/status counts 1" in n for n in res["notes"])
    assert "(2 requests waited that long)" in ex.markdown(res)


def test_the_proxys_release_reason_predicted_wait_and_arrival_are_used(tmp_path):
    # the starvation case above, from a proxy that logs why each request
    # went (release=), the engine wait it predicted (prefill_pred_wait_ms=)
    # and its arrival in Unix us (start_us=): request 3 also waited past the
    # timeout but was released by the queue order, so only request 2 counts
    # as starved, as /omni/status says
    def log(i, arrive, release, wait=0):
        return dict(log=f"prefill_pred_wait_ms={wait} release={release} "
                        f"start_us={int(T0 * 1e6) + arrive * 1000}")
    d = write_run(tmp_path, [
        dict(arrive=0, queue=0, leg=2000, inst=P0, ttft=2050, **log(0, 0, "now")),
        dict(arrive=0, queue=0, leg=400, inst=P1, ttft=450, **log(1, 0, "now")),
        dict(arrive=50, queue=350, leg=1000, inst=P1, ttft=1400, prompt=5000,
             **log(2, 50, "starved")),
        dict(arrive=100, queue=1300, leg=10, inst=P1, ttft=1320, prompt=100,
             engine_queue=30, engine_ttft=8, decode=2, **log(3, 100, "order", 25))],
        starve=300, status_starved=1)
    res = ex.explain(str(d))
    assert res["released_by_starvation"] == 1
    assert not any("/omni/status counts" in n for n in res["notes"])
    assert res["release_reasons"] == {"now": 2, "starved": 1, "order": 1}
    # a starved release is what the log says, not a time held
    assert "(1 released as starved)" in ex.markdown(res)
    c = causes(res, 3)
    assert c["starved"] == pytest.approx(1000, abs=0.01)
    # 25 ms of engine queueing was predicted at release: beyond it, 5 ms
    assert c["mispredict"] == pytest.approx(5, abs=0.01)
    # what the log records is no longer listed as missing
    assert not any("$omni_release_reason" in m or "$omni_start_us" in m
                   or "$omni_prefill_pred_wait_ms" in m for m in res["missing"])
    assert "released (the proxy's $omni_release_reason): now 2" in res["markdown"]


def test_a_hit_the_index_expected_and_the_engine_did_not_have(tmp_path):
    # 4000 tokens: alone 2 + 8 = 10 ms from scratch; the index said 3000 were
    # cached (alone 4 ms), the engine had none: 6 ms misprediction, 4 own
    d = write_run(tmp_path, [
        dict(arrive=0, queue=0, leg=12, inst=P0, ttft=20, prompt=4000, index_hit=3000,
             engine_hit=0, engine_queue=0, engine_ttft=10, decode=5)])
    c = causes(ex.explain(str(d)), 0)
    assert c["mispredict"] == pytest.approx(6) and c["prefill"] == pytest.approx(4)
    assert c["shared"] == pytest.approx(0) and c["overhead"] == pytest.approx(5)


def test_totals_are_shares_of_all_ttft_and_the_worst_come_first(tmp_path):
    d = write_run(tmp_path, [
        dict(arrive=0, queue=0, leg=100, inst=P0, ttft=150),
        dict(arrive=10, queue=90, leg=100, inst=P0, ttft=250)])
    res = ex.explain(str(d), worst=1)
    assert sum(res["shares"].values()) == pytest.approx(1.0)
    # without the simulator's records only the instances in the log are known
    assert res["totals_ms"]["wait"] == pytest.approx(90)
    slow = res["markdown"].split("The 1 slowest")[1]
    assert "| 1 | 250 |" in slow and "| 0 | 150 |" not in slow


def test_an_instance_never_used_counts_as_idle_when_the_simulator_lists_it(tmp_path):
    # same as above, with the simulator's records naming P1: request 1 was
    # held 90 ms while P1 had nothing
    d = write_run(tmp_path, [
        dict(arrive=0, queue=0, leg=100, inst=P0, ttft=150, engine_queue=0,
             engine_ttft=4, decode=5),
        dict(arrive=10, queue=90, leg=100, inst=P0, ttft=250, engine_queue=0,
             engine_ttft=4, decode=5)])
    assert causes(ex.explain(str(d)), 1)["idle"] == pytest.approx(90)


def test_an_aggregated_run_has_one_leg_to_the_first_token(tmp_path):
    # no prefill leg in the log: the leg is the proxy's TTFT less the hold,
    # on the instance in decode=; what follows it is overhead, not a decode leg
    d = write_run(tmp_path, [
        dict(arrive=0, queue=0, leg=300, inst=P0, ttft=302),
        dict(arrive=100, queue=200, leg=50, inst=P0, ttft=253)], mode="aggregated")
    res = ex.explain(str(d))
    c = causes(res, 1)
    assert c["wait"] == pytest.approx(200) and c["prefill"] == 50
    assert c["decode"] == 0 and c["overhead"] == pytest.approx(3)


def test_a_parallel_run_counts_the_transfer_after_the_prefill_engine(tmp_path):
    # parallel P/D: both legs leave at the send. Request 0 on P0: the
    # prefill engine has it 2 ms after the send and is done 240 ms later;
    # the prefill leg answers at 300 (after the KV transfer), the decode
    # engine (which had it from the send) gives the first token, and the
    # client sees it at 312. Request 1 waits from 100 to 262 while P1 is busy
    # all along and P0's engine is free from 242: 20 ms an instance was idle
    d = write_run(tmp_path, [
        dict(arrive=0, queue=0, leg=300, inst=P0, ttft=312, engine_queue=0,
             engine_ttft=240, decode=305, hop=2),
        dict(arrive=0, queue=0, leg=2000, inst=P1, ttft=2100),
        dict(arrive=100, queue=162, leg=100, inst=P0, ttft=380, engine_queue=0,
             engine_ttft=80, decode=110, hop=2)], mode="parallel")
    res = ex.explain(str(d))
    c = causes(res, 0)
    assert c["overhead"] == pytest.approx(2, abs=0.01)
    assert c["decode"] == pytest.approx(312 - 2 - 240, abs=0.01)
    assert c["shared"] + c["prefill"] == pytest.approx(240, abs=0.01)
    assert all(v >= 0 for v in c.values()) and sum(c.values()) == pytest.approx(312)
    c = causes(res, 1 + 1)
    assert c["idle"] == pytest.approx(20, abs=0.01)
    assert c["wait"] + c["idle"] == pytest.approx(162, abs=0.01)
    assert all(v >= 0 for v in c.values()) and sum(c.values()) == pytest.approx(380)
    assert "parallel P/D" in res["markdown"]
    assert "tokenizer service" not in res["markdown"]


def test_a_run_that_tokenized_in_the_proxy_says_its_holds_include_that(tmp_path):
    d = write_run(tmp_path, [dict(arrive=0, queue=30, leg=100, inst=P0, ttft=140)])
    conf = d / "run" / "nginx.conf"
    conf.write_text(conf.read_text().replace(
        "http {", "http {\n    omni_model_path /models/m;"))
    assert "tokenizer service" in ex.explain(str(d))["markdown"]


def test_bad_run_directories_get_clear_errors(tmp_path):
    with pytest.raises(BenchError, match="not a directory"):
        ex.explain(str(tmp_path / "nope"))
    with pytest.raises(BenchError, match="no requests.jsonl"):
        ex.explain(str(tmp_path))
    (tmp_path / "requests.jsonl").write_text('{"index": 0, "ok": true, "ttft_ms": 5}\n')
    with pytest.raises(BenchError, match="access log"):
        ex.explain(str(tmp_path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "access.log").write_text("")
    with pytest.raises(BenchError, match="not an Omni Proxy run"):
        ex.explain(str(tmp_path))


def test_the_command_prints_the_table_or_json(tmp_path):
    d = write_run(tmp_path, [dict(arrive=0, queue=0, leg=100, inst=P0, ttft=150)])
    out = subprocess.run([sys.executable, "-m", "omni_ctl.cli", "explain", str(d)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "| cause | share |" in out.stdout
    js = subprocess.run([sys.executable, "-m", "omni_ctl.cli", "explain", str(d), "--json"],
                        capture_output=True, text=True, timeout=60)
    assert json.loads(js.stdout)["requests"][0]["causes_ms"]["prefill"] == 100
    # a bench run against a proxy started elsewhere: its log and config given
    moved = tmp_path / "elsewhere"
    (d / "run").rename(moved)
    js = subprocess.run([sys.executable, "-m", "omni_ctl.cli", "explain", str(d), "--json",
                         "--access-log", str(moved / "access.log"),
                         "--nginx-conf", str(moved / "nginx.conf")],
                        capture_output=True, text=True, timeout=60)
    assert js.returncode == 0, js.stderr
    got = json.loads(js.stdout)
    assert got["hold_slack_ms"] == 20 and not any("nginx.conf" in n for n in got["notes"])
    bad = subprocess.run([sys.executable, "-m", "omni_ctl.cli", "explain",
                          str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
