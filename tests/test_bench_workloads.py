"""Workload generation, SLO parsing, SSE framing and statistics of `omni-ctl bench`."""

import json
import subprocess
import sys

import numpy as np
import pytest

from omni_ctl.bench import client, core, workloads
from omni_ctl.bench.errors import BenchError
from omni_ctl.bench.metrics import RequestRecord, parse_slo, stats, summarize

TRACE = workloads.trace_path("mooncake")   # shipped as package data


def _write_trace(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- traces -----------------------------------------------------------------

def test_shared_hash_ids_give_shared_token_prefixes():
    a = workloads.trace_prompt_tokens([5, 6, 7], 1400)
    b = workloads.trace_prompt_tokens([5, 6, 9, 10], 1900)
    c = workloads.trace_prompt_tokens([4, 6, 7], 1400)
    assert len(a) == 1400 and len(b) == 1900
    assert a[:1024] == b[:1024]             # blocks 5, 6 shared
    assert a[1024:1100] != b[1024:1100]     # block 7 vs 9
    assert a[:512] != c[:512]               # different first block ...
    assert a[512:1024] == c[512:1024]       # ... same id, same tokens
    assert all(workloads.TOKEN_LO <= t < workloads.TOKEN_HI for t in a + b)


def test_partial_last_block_is_a_prefix_of_the_full_block():
    short = workloads.trace_prompt_tokens([1, 2], 700)
    full = workloads.trace_prompt_tokens([1, 2], 1024)
    assert full[:700] == short


def test_token_prompts_are_deterministic_across_processes():
    code = ("from omni_ctl.bench import workloads as w; "
            "print(sum(w.trace_prompt_tokens([3, 99, 43923], 1500)), "
            "w.trace_prompt_tokens([7], 5), w.trace_prompt_text([7], 4))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": str(seed)}).stdout
            for seed in (0, 1)]
    assert runs[0] == runs[1]
    here = workloads.trace_prompt_tokens([3, 99, 43923], 1500)
    assert runs[0].split()[0] == str(sum(here))


def test_block_tokens_look_random():
    t = np.array(workloads.token_block(workloads.content_key("x"), 20000))
    assert t.min() >= workloads.TOKEN_LO and t.max() < workloads.TOKEN_HI
    assert len(set(t.tolist())) > 10000
    assert abs(t.mean() - (workloads.TOKEN_LO + workloads.TOKEN_HI) / 2) < 500


def test_text_mode_shares_prefixes_and_matches_lengths_in_words():
    a = workloads.trace_prompt_text([5, 6, 7], 1400)
    b = workloads.trace_prompt_text([5, 6, 9], 1100)
    wa, wb = a.split(" "), b.split(" ")
    assert len(wa) == 1400 and len(wb) == 1100
    assert wa[:1024] == wb[:1024] and wa[1024:1076] != wb[1024:1076]
    assert a.startswith(" ".join(wa[:1024]))


def test_trace_workload_lengths_and_arrivals(tmp_path):
    path = _write_trace(tmp_path / "t.jsonl", [
        {"timestamp": 500, "input_length": 513, "output_length": 7, "hash_ids": [0, 1]},
        {"timestamp": 2500, "input_length": 100, "output_length": 1, "hash_ids": [0]},
    ])
    sessions = workloads.trace_workload(path, None, "tokens", speedup=2.0)
    assert [s.arrival_s for s in sessions] == [0.0, 1.0]
    assert [s.turns[0].max_tokens for s in sessions] == [7, 1]
    prompts = [client.user_prompt(s.turns[0].prompt) for s in sessions]
    assert [len(p) for p in prompts] == [513, 100]
    assert prompts[0][:100] == prompts[1]


def test_bad_trace_lines_are_named(tmp_path):
    path = _write_trace(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]},
        {"timestamp": 1, "input_length": 2000, "output_length": 1, "hash_ids": [0]},
    ])
    with pytest.raises(BenchError, match="line 2"):
        workloads.read_trace(path)
    (tmp_path / "u.jsonl").write_text('{"timestamp": 0}\n')
    with pytest.raises(BenchError, match="line 1 is not a Mooncake record"):
        workloads.read_trace(str(tmp_path / "u.jsonl"))
    with pytest.raises(BenchError, match="does not exist"):
        workloads.read_trace(str(tmp_path / "missing.jsonl"))


def test_mooncake_trace_converts_with_exact_lengths():
    assert len(workloads.read_trace("mooncake")) == 3993   # the whole shipped trace
    sessions = core.make_workload(core.WorkloadSpec(workload="trace:mooncake",
                                                    num_requests=50))
    rows = workloads.read_trace(TRACE)[:50]
    for s, row in zip(sessions, rows):
        prompt = client.user_prompt(s.turns[0].prompt)
        assert len(prompt) == row["input_length"] == s.turns[0].prompt_len
        assert s.turns[0].max_tokens == row["output_length"]


# --- gsp, multiturn, random ----------------------------------------------------

def test_gsp_groups_share_system_prompt_tokens():
    sessions = workloads.gsp_workload(3, 4, 200, 20, 8, "tokens", seed=1)
    assert len(sessions) == 12
    by_group = {}
    for s in sessions:
        assert len(s.turns[0].prompt) == 220 and s.turns[0].max_tokens == 8
        by_group.setdefault(s.group, []).append(s.turns[0].prompt)
    assert sorted(by_group) == [0, 1, 2]
    for prompts in by_group.values():
        assert len(prompts) == 4
        assert all(p[:200] == prompts[0][:200] for p in prompts)
        assert len({tuple(p[200:]) for p in prompts}) == 4
    firsts = {tuple(p[0][:200]) for p in by_group.values()}
    assert len(firsts) == 3
    # shuffled: groups interleave, and the order is seeded
    assert [s.group for s in sessions] != sorted(s.group for s in sessions)
    again = workloads.gsp_workload(3, 4, 200, 20, 8, "tokens", seed=1)
    assert [s.turns[0].prompt for s in again] == [s.turns[0].prompt for s in sessions]


def test_gsp_text_mode_uses_a_system_prompt():
    sessions = workloads.gsp_workload(2, 2, 30, 5, 4, "text", seed=0)
    for s in sessions:
        assert len(s.system.split(" ")) == 30 and len(s.turns[0].prompt.split(" ")) == 5
    cfg = client.BenchConfig(target="x", concurrency=1)
    body = client.build_body(cfg, "m", sessions[0], 0, sessions[0].turns[0].prompt)
    assert body["prompt"] == sessions[0].system + "\n\n" + sessions[0].turns[0].prompt
    chat = client.build_body(client.BenchConfig(target="x", endpoint="chat"), "m",
                             sessions[0], 0, sessions[0].turns[0].prompt)
    assert chat["messages"][0] == {"role": "system", "content": sessions[0].system}


def test_gsp_num_requests_beyond_the_groups_is_an_error():
    with pytest.raises(BenchError, match="--num-requests 9"):
        workloads.gsp_workload(2, 4, 10, 5, 4, "text", seed=0, num_requests=9)


def test_multiturn_shape():
    sessions = workloads.multiturn_workload(10, 4, 20, 6, 3, seed=0)
    assert [len(s.turns) for s in sessions] == [4, 4, 2]
    assert sessions[0].turns[0].prompt_len == 26 and sessions[0].turns[1].prompt_len == 6
    assert len({s.system for s in sessions}) == 3


def test_multiturn_completions_prompt_grows_with_history():
    sessions = workloads.multiturn_workload(2, 2, 4, 3, 2, seed=0)
    s = sessions[0]
    cfg = client.BenchConfig(target="x", concurrency=1)
    first = client.build_body(cfg, "m", s, 0, s.turns[0].prompt)["prompt"]
    s.history.append((s.turns[0].prompt, " answer"))
    second = client.build_body(cfg, "m", s, 1, s.turns[1].prompt)["prompt"]
    assert second.startswith(first)
    assert second.endswith(f"User: {s.turns[1].prompt}\nAssistant:")


def test_random_lengths_within_range_and_seeded():
    a = workloads.random_workload(50, 100, 20, 0.5, "tokens", seed=4)
    b = workloads.random_workload(50, 100, 20, 0.5, "tokens", seed=4)
    assert [s.turns[0].prompt for s in a] == [s.turns[0].prompt for s in b]
    for s in a:
        assert 50 <= len(s.turns[0].prompt) <= 150 and 10 <= s.turns[0].max_tokens <= 30
    with pytest.raises(BenchError, match="--random-range-ratio"):
        workloads.random_workload(1, 10, 10, 1.5, "text", 0)


def test_workload_spec_errors_name_the_option():
    with pytest.raises(BenchError, match="--workload"):
        core.make_workload(core.WorkloadSpec(workload="sharegpt"))
    with pytest.raises(BenchError, match="--prompt-mode tokens needs --endpoint"):
        core.make_workload(core.WorkloadSpec(workload="random", prompt_mode="tokens",
                                             endpoint="chat"))
    with pytest.raises(BenchError, match="not both"):
        core.arrival_mode(core.WorkloadSpec(), 1.0, 4)


# --- SLOs -------------------------------------------------------------------------

def test_slo_parsing():
    assert parse_slo("ttft=2s,tpot=50ms") == {"ttft": 2000.0, "tpot": 50.0}
    assert parse_slo(" TTFT = 1.5s , e2e=30000 ") == {"ttft": 1500.0, "e2e": 30000.0}
    assert parse_slo("tpot=250us") == {"tpot": 0.25}
    assert parse_slo(None) == {} and parse_slo("") == {}


@pytest.mark.parametrize("text,message", [
    ("ttft=2x", "cannot read 'ttft=2x'"),
    ("ttft", "cannot read 'ttft'"),
    ("ttft=2s,", "cannot read ''"),
    ("latency=2s", "unknown metric 'latency'"),
    ("ttft=1s,ttft=2s", "'ttft' is given twice"),
    ("tpot=0ms", "must be above zero"),
    ("ttft=-1s", "cannot read 'ttft=-1s'"),
])
def test_slo_errors_are_clear(text, message):
    with pytest.raises(BenchError) as err:
        parse_slo(text)
    assert message in str(err.value.message) and "--slo" in err.value.message


# --- SSE framing and statistics ---------------------------------------------------

def test_sse_parser_handles_split_and_joined_events():
    p = client.SSEParser()
    assert p.feed(b'data: {"a"') == []
    assert p.feed(b': 1}\n\ndata: {"b": 2}\r\n\r\n: keep-alive\n\nda') == \
        [b'{"a": 1}', b'{"b": 2}']
    assert p.feed(b"ta: [DONE]") == []
    assert p.close() == [b"[DONE]"]


def test_chunk_text_ignores_role_and_usage_chunks():
    assert client.chunk_text({"choices": [{"delta": {"role": "assistant"}}]}, True) == ""
    assert client.chunk_text({"choices": [], "usage": {"completion_tokens": 3}}, False) == ""
    assert client.chunk_text({"choices": [{"text": "hi"}]}, False) == "hi"
    assert client.chunk_text({"choices": [{"delta": {"content": "x"}}]}, True) == "x"


def test_stats_percentiles_and_empty():
    s = stats(range(1, 101))
    assert s["mean"] == 50.5 and s["p50"] == 50.5
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert stats([])["p99"] is None


def test_tpot_undefined_for_one_token_and_not_an_slo_violation():
    r = RequestRecord(0, 0, 0, ttft_ms=10.0, e2e_ms=10.0, output_tokens=1, ok=True)
    assert r.tpot_ms is None and r.meets({"tpot": 1.0})
    s = summarize([r], 1.0, {"tpot": 1.0})
    assert s["tpot_ms"]["count"] == 0 and s["good_requests"] == 1
