"""`omni-ctl compare` with its bound rows and `omni-ctl explain` on a small
real run: the simulator (2 prefill + 1 decode instances) and Omni Proxy
started for real, 30 requests arriving faster than two prefill instances
serve them."""

import json

import pytest

from omni_ctl.bench import compare, explain, omni

pytest.importorskip("omni_ctl.sim.cluster", reason="the simulator is not in this build")


@pytest.mark.skipif(omni.available() is not None, reason=f"{omni.available()}")
def test_compare_adds_bounds_and_explain_attributes_every_request(tmp_path):
    res = compare.run_compare(
        targets="omni", prefill=2, decode=1, pd_policy="sequential",
        sim_args="--preset llama3-8b-h100 --speedup 4", out_dir=str(tmp_path), quiet=True,
        workload="random", num_requests=30, random_input_len=6000,
        random_range_ratio=0.9, random_output_len=8, prompt_mode="tokens", rate=30.0,
        max_duration=90.0, request_timeout=60.0)
    s = res["summaries"][0]
    assert s["completed"] == 30, s["error_kinds"]

    # the bound rows and the multiples, computed from this run's requests
    b = json.load(open(tmp_path / "bound.json"))
    assert b["source"] == "omni" and b["requests"] == 30 and b["notes"] == []
    assert b["cluster"].startswith("2P+1D, sequential, preset llama3-8b-h100, speedup 4")
    for pol in ("sjf", "fcfs", "srpt"):
        assert set(b["policies"][pol]["requests"]) == {str(i) for i in range(30)}
        assert f"| {b['policies'][pol]['label']} | 30/0 |" in res["markdown"]
    assert "| omni | " in res["markdown"].split("mean / SJF")[1]
    saved = json.load(open(tmp_path / "compare.json"))
    assert saved["sim_args"] == ["--preset", "llama3-8b-h100", "--speedup", "4"]
    assert "requests" not in saved["bounds"]["policies"]["sjf"]

    # every completed request attributed; the causes add up to its TTFT
    ex = explain.explain(str(tmp_path / "omni"))
    assert len(ex["requests"]) == 30 and ex["notes"] == [], ex["notes"]
    client = {json.loads(line)["index"]: json.loads(line)
              for line in open(tmp_path / "omni" / "requests.jsonl")}
    for r in ex["requests"]:
        c = r["causes_ms"]
        assert sum(c.values()) == pytest.approx(client[r["index"]]["ttft_ms"], abs=0.01)
        assert min(c.values()) >= -3.0, c        # ms rounding of the log's instants
        assert c["prefill"] > 0 and c["decode"] > 0
        assert r["cached_tokens_engine"] is not None     # the simulator's record found
    # prompts and no shared prefixes: the model's own work is most of the prefill
    assert ex["shares"]["prefill"] > 0.05     # present; its size depends on the load
    assert "| no instance free |" in ex["markdown"]
