"""`omni-ctl bench` as plain functions: workload spec -> run -> summary and files."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from . import bound, client, report, simstats, workloads
from .errors import BenchError
from .metrics import summarize


@dataclass
class WorkloadSpec:
    """Everything that decides what is sent (not when or where)."""
    workload: str = "gsp"            # gsp | multiturn | random | trace:PATH
    num_requests: int | None = None
    prompt_mode: str = "auto"        # tokens | text | auto
    endpoint: str = "completions"
    seed: int = 0
    speedup: float = 1.0
    gsp_groups: int = 8
    gsp_prompts_per_group: int = 16
    gsp_system_len: int = 2048
    gsp_question_len: int = 128
    gsp_output_len: int = 128
    mt_turns: int = 4
    mt_system_len: int = 512
    mt_user_len: int = 128
    mt_output_len: int = 128
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0


DEFAULT_NUM_REQUESTS = 200


def spec_from_options(options: dict) -> WorkloadSpec:
    """Take the WorkloadSpec fields out of a dict of command options."""
    return WorkloadSpec(**{k: options.pop(k) for k in list(options)
                           if k in WorkloadSpec.__dataclass_fields__})


def prompt_mode(spec: WorkloadSpec) -> str:
    mode = spec.prompt_mode
    if mode == "auto":
        mode = "tokens" if spec.workload.startswith("trace:") \
            and spec.endpoint == "completions" else "text"
    if mode not in workloads.PROMPT_MODES:
        raise BenchError(f"--prompt-mode must be tokens, text or auto, got '{mode}'")
    if mode == "tokens" and spec.endpoint == "chat":
        raise BenchError("--prompt-mode tokens needs --endpoint completions "
                         "(chat messages are text)")
    return mode


def make_workload(spec: WorkloadSpec) -> list[workloads.Session]:
    """Fresh sessions for one run (multi-turn sessions fill in their history
    as they run, so every target gets its own copy)."""
    if spec.num_requests is not None and spec.num_requests < 1:
        raise BenchError(f"--num-requests must be >= 1, got {spec.num_requests}")
    if not spec.speedup > 0:
        raise BenchError(f"--speedup must be > 0, got {spec.speedup}")
    mode = prompt_mode(spec)
    w = spec.workload
    if w.startswith("trace:"):
        return workloads.trace_workload(w[len("trace:"):], spec.num_requests, mode,
                                        spec.speedup)
    if w == "gsp":
        return workloads.gsp_workload(
            spec.gsp_groups, spec.gsp_prompts_per_group, spec.gsp_system_len,
            spec.gsp_question_len, spec.gsp_output_len, mode, spec.seed,
            spec.num_requests)
    n = spec.num_requests or DEFAULT_NUM_REQUESTS
    if w == "multiturn":
        if mode != "text":
            raise BenchError("the multiturn workload is text only (--prompt-mode text)")
        return workloads.multiturn_workload(n, spec.mt_turns, spec.mt_system_len,
                                            spec.mt_user_len, spec.mt_output_len,
                                            spec.seed)
    if w == "random":
        return workloads.random_workload(n, spec.random_input_len,
                                         spec.random_output_len,
                                         spec.random_range_ratio, mode, spec.seed)
    raise BenchError(f"--workload must be gsp, multiturn, random or trace:PATH, got '{w}'")


def arrival_mode(spec: WorkloadSpec, rate, concurrency) -> dict:
    """Which loop to run: explicit --rate / --concurrency, else the trace's own
    times, else closed loop at concurrency 16."""
    if rate is not None and concurrency is not None:
        raise BenchError("give --rate (open loop) or --concurrency (closed loop), not both")
    is_trace = spec.workload.startswith("trace:")
    if rate is not None or concurrency is not None:
        return {"rate": rate, "concurrency": concurrency, "use_arrival_times": False}
    if is_trace:
        return {"rate": None, "concurrency": None, "use_arrival_times": True}
    return {"rate": None, "concurrency": 16, "use_arrival_times": False}


def bench_config(target: str, spec: WorkloadSpec, options: dict,
                 **overrides) -> client.BenchConfig:
    """A BenchConfig from the load options of a command (see cli.load_options)."""
    mode = arrival_mode(spec, options.get("rate"), options.get("concurrency"))
    values = dict(
        target=target, endpoint=spec.endpoint, stream=options.get("stream", True),
        model=options.get("model"), max_duration_s=options.get("max_duration", 600.0),
        request_timeout_s=options.get("request_timeout", 300.0), seed=spec.seed,
        extra_body=options.get("extra_body") or {}, **mode)
    values.update(overrides)
    return client.BenchConfig(**values)


def describe_load(cfg: client.BenchConfig, spec: WorkloadSpec) -> str:
    if cfg.concurrency is not None:
        return f"closed loop, concurrency {cfg.concurrency}"
    if cfg.rate is not None:
        return "open loop, all at once" if math.isinf(cfg.rate) \
            else f"open loop, Poisson {cfg.rate:g} req/s"
    return f"open loop, trace times / {spec.speedup:g}"


def run_bench(cfg: client.BenchConfig, spec: WorkloadSpec, slo: dict,
              label: str | None = None, out_dir: str | None = None,
              plots: bool = True, engine_metrics=()) -> tuple[dict, client.RunResult]:
    """Run one benchmark; return its summary (and write files when out_dir).
    `engine_metrics`: engine base URLs whose /metrics give the prefix-cache
    hit rate when no simulator stats do (real engines)."""
    from . import enginemetrics
    sessions = make_workload(spec)
    before = [enginemetrics.scrape(u) for u in engine_metrics]
    result = client.run(cfg, sessions)
    after = [enginemetrics.scrape(u) for u in engine_metrics]
    s = summarize(result.records, result.duration_s, slo, result.not_sent)
    s["label"] = label or (result.target_label or {}).get("schedule_policy") or cfg.target
    s["target"] = cfg.target
    s["target_info"] = result.target_label
    s["stopped_at_max_duration"] = result.stopped_early
    s["config"] = {"workload": spec.workload, "endpoint": cfg.endpoint,
                   "stream": cfg.stream, "model": result.model,
                   "prompt_mode": prompt_mode(spec), "load": describe_load(cfg, spec),
                   "seed": spec.seed, "max_duration_s": cfg.max_duration_s,
                   "run_id": cfg.run_id,
                   "planned_requests": len(result.records) + result.not_sent}
    s["prefix_cache_hit_rate"] = None
    if result.sim_before is not None and result.sim_after is not None:
        sim = simstats.cluster_summary(result.sim_before, result.sim_after,
                                       result.sim_samples)
        s["prefix_cache_hit_rate"] = sim.pop("prefix_cache_hit_rate")
        s["sim"] = sim
        # each request's prefill (cache hit, engine-side times): the bound
        # and `omni-ctl explain` read them
        result.sim_requests = bound.sim_requests(cfg.sim_stats_url)
    if engine_metrics:
        s["engine_prefix_cache"] = enginemetrics.hit_rate(before, after)
        if s["prefix_cache_hit_rate"] is None:
            s["prefix_cache_hit_rate"] = s["engine_prefix_cache"]["hit_rate"]
    if out_dir:
        paths = report.write_run(out_dir, s, result.records)
        if result.sim_requests is not None:
            paths["sim_requests"] = os.path.join(out_dir, "sim_requests.json")
            with open(paths["sim_requests"], "w") as f:
                json.dump(result.sim_requests, f)
        if plots:
            paths["plots"] = report.write_plots(
                out_dir, {s["label"]: result.records}, {s["label"]: result.sim_samples})
        s["files"] = paths
    return s, result


def default_out_dir(name: str = "bench-out") -> str:
    return os.path.join(os.getcwd(), name)
