"""`omni-ctl bench --engine-metrics`: the prefix-cache hit rate read from the
engines' own /metrics (vLLM and SGLang names) agrees with the simulator's
ground truth (/sim/stats) over the same run."""

import pytest

from omni_ctl.bench import core, enginemetrics
from omni_ctl.bench.errors import BenchError
from omni_ctl.sim.cluster import SimCluster


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_hit_rate_from_engine_metrics_matches_the_simulator(engine):
    # aggregated instances answer /v1/completions themselves: bench one directly
    with SimCluster(prefill=0, decode=0, both=1, engine=engine, preset="tiny") as sim:
        url = sim.urls[0]
        spec = core.WorkloadSpec(workload="gsp", num_requests=12, gsp_groups=2,
                                 gsp_prompts_per_group=6, gsp_system_len=256,
                                 gsp_question_len=16, gsp_output_len=4)
        cfg = core.bench_config(url, spec, {"concurrency": 1}, progress=False,
                                sim_stats_url=url)
        s, result = core.run_bench(cfg, spec, {}, engine_metrics=[url])
        assert all(r.ok for r in result.records)
        truth = s["prefix_cache_hit_rate"]          # from /sim/stats
        assert s["sim"]["prefix_cache_queried_tokens"] > 0
        got = s["engine_prefix_cache"]
        assert got["engines"] == 1 and got["queried_tokens"] > 0
        assert 0.3 < got["hit_rate"] < 1.0          # 2 shared system prompts
        assert got["hit_rate"] == pytest.approx(truth, abs=0.05 if engine == "sglang"
                                                else 1e-9)


def test_vllm_counters_summed_over_engines_and_label_sets():
    before = [enginemetrics.parse(
        'vllm:prefix_cache_queries_total{engine="0"} 100\n'
        'vllm:prefix_cache_queries_total{engine="1"} 50\n'
        'vllm:prefix_cache_hits_total{engine="0"} 10\n'
        'vllm:prefix_cache_hits_total{engine="1"} 0\n')]
    after = [enginemetrics.parse(
        'vllm:prefix_cache_queries_total{engine="0"} 300\n'
        'vllm:prefix_cache_queries_total{engine="1"} 150\n'
        'vllm:prefix_cache_hits_total{engine="0"} 110\n'
        'vllm:prefix_cache_hits_total{engine="1"} 50\n')]
    r = enginemetrics.hit_rate(before, after)
    assert r["queried_tokens"] == 300 and r["hit_tokens"] == 150 and r["hit_rate"] == 0.5


def test_no_cache_metrics_gives_no_rate_and_bad_urls_say_so():
    assert enginemetrics.hit_rate([{}], [{}])["hit_rate"] is None
    with pytest.raises(BenchError, match="cannot read http://127.0.0.1:9/metrics"):
        enginemetrics.scrape("http://127.0.0.1:9")
