"""Prometheus text exposition for the simulated engines (vLLM or SGLang names)."""

import bisect

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
               0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v):
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1


def _labels(d):
    return ",".join(f'{k}="{v}"' for k, v in d.items())


class _Writer:
    def __init__(self):
        self.lines = []

    def family(self, name, kind, help_text):
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def gauge(self, name, help_text, labels, value):
        self.family(name, "gauge", help_text)
        self.lines.append(f"{name}{{{_labels(labels)}}} {float(value)!r}")

    def counter(self, name, help_text, labels, value):
        # the classic text format names a counter family with its _total
        self.family(name + "_total", "counter", help_text)
        self.lines.append(f"{name}_total{{{_labels(labels)}}} {float(value)!r}")

    def histogram(self, name, help_text, labels, h):
        self.family(name, "histogram", help_text)
        lab = _labels(labels)
        acc = 0
        for bound, n in zip(h.bounds, h.counts):
            acc += n
            self.lines.append(f'{name}_bucket{{{lab},le="{bound!r}"}} {float(acc)!r}')
        self.lines.append(f'{name}_bucket{{{lab},le="+Inf"}} {float(h.count)!r}')
        self.lines.append(f"{name}_count{{{lab}}} {float(h.count)!r}")
        self.lines.append(f"{name}_sum{{{lab}}} {float(h.sum)!r}")

    def text(self):
        return "\n".join(self.lines) + "\n"


def _sim_counters(w, model_name, eng):
    """The simulator's own counters (no engine has them)."""
    lab = {"model_name": model_name}
    w.counter("sim:token_parity_mismatch", "Forwarded token-id prompts that differ "
              "from the simulator's own tokenization.", lab, eng.token_parity_mismatches)
    w.counter("sim:tokenize_skipped_tokens", "Prompt tokens received as ids, "
              "not tokenized.", lab, eng.tokenize_skipped_tokens)


def render(engine_kind, model_name, eng):
    """Prometheus text for one instance's Engine `eng`."""
    w = _Writer()
    _sim_counters(w, model_name, eng)
    if engine_kind == "sglang":
        lab = {"model_name": model_name}
        w.gauge("sglang:num_running_reqs", "The number of running requests.", lab, len(eng.running))
        w.gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", lab, eng.num_waiting)
        w.gauge("sglang:token_usage", "The token usage (KV cache fraction in use).", lab, eng.pool.usage())
        hit = eng.prefix_hits / eng.prefix_queried if eng.prefix_queried else 0.0
        w.gauge("sglang:cache_hit_rate", "The prefix cache hit rate (tokens).", lab, hit)
        w.counter("sglang:prompt_tokens", "Number of prefill tokens processed.", lab, eng.prompt_tokens_total)
        w.counter("sglang:generation_tokens", "Number of generation tokens processed.", lab, eng.generation_tokens_total)
        w.counter("sglang:num_requests", "Number of requests processed.", lab, eng.requests_finished)
        w.histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", lab, eng.h_ttft)
        w.histogram("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", lab, eng.h_itl)
        w.histogram("sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds", lab, eng.h_e2e)
        return w.text()
    lab = {"model_name": model_name, "engine": "0"}
    w.gauge("vllm:num_requests_running", "Number of requests in model execution batches.", lab, len(eng.running))
    w.gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lab, eng.num_waiting)
    w.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lab, eng.pool.usage())
    # vLLM's info gauge: the KV capacity is num_gpu_blocks x block_size
    w.gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
            {"block_size": str(eng.pool.block_size), "cache_dtype": "auto",
             "enable_prefix_caching": "True",
             "num_gpu_blocks": str(eng.pool.num_blocks), "num_cpu_blocks": "0"}, 1)
    w.counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", lab, eng.prefix_queried)
    w.counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", lab, eng.prefix_hits)
    w.counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", lab, eng.preemptions_total)
    w.counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lab, eng.prompt_tokens_total)
    w.counter("vllm:generation_tokens", "Number of generation tokens processed.", lab, eng.generation_tokens_total)
    w.family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    for reason in ("stop", "length", "abort"):
        n = eng.finished_by_reason.get(reason, 0)
        if reason == "abort":
            n = eng.aborted_total
        w.lines.append(f'vllm:request_success_total{{{_labels(lab)},finished_reason="{reason}"}} {float(n)!r}')
    w.histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", lab, eng.h_ttft)
    w.histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", lab, eng.h_itl)
    w.histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", lab, eng.h_e2e)
    w.histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", lab, eng.h_queue)
    return w.text()
