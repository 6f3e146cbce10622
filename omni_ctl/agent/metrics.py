"""What the agent reads from an engine's /metrics (PROTOCOLS.md section 5).

vLLM: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` and the capacity from `vllm:cache_config_info`'s
labels (num_gpu_blocks x block_size).  SGLang: `sglang:num_running_reqs`,
`sglang:num_queue_reqs`, `sglang:token_usage` (its capacity comes from
/get_server_info).  With several engines (DP ranks, label `engine`) the
counts and capacities add up and the usage is their mean.
"""

import dataclasses

from prometheus_client.parser import text_string_to_metric_families

_NAMES = {
    "vllm": {"running": "vllm:num_requests_running",
             "waiting": "vllm:num_requests_waiting",
             "usage": "vllm:kv_cache_usage_perc"},
    "sglang": {"running": "sglang:num_running_reqs",
               "waiting": "sglang:num_queue_reqs",
               "usage": "sglang:token_usage"},
}


@dataclasses.dataclass
class EngineMetrics:
    engine: str = None
    running: int = None
    waiting: int = None
    kv_usage: float = None
    capacity_tokens: int = None


def parse_metrics(text):
    """EngineMetrics of a Prometheus text page; ValueError if it is not one."""
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append(s)
    out = EngineMetrics()
    for engine, names in _NAMES.items():
        if any(n in samples for n in names.values()):
            out.engine = engine
            vals = {k: [s.value for s in samples.get(n, [])] for k, n in names.items()}
            if vals["running"]:
                out.running = int(sum(vals["running"]))
            if vals["waiting"]:
                out.waiting = int(sum(vals["waiting"]))
            if vals["usage"]:
                out.kv_usage = min(max(sum(vals["usage"]) / len(vals["usage"]), 0.0), 1.0)
            break
    cap = 0
    for s in samples.get("vllm:cache_config_info", []):
        try:
            cap += int(s.labels["num_gpu_blocks"]) * int(s.labels["block_size"])
        except (KeyError, ValueError):
            continue
    out.capacity_tokens = cap or None
    return out
