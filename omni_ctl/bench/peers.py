"""Command lines of the peer routers (sglang-router and vllm-router from PyPI)."""

from __future__ import annotations

from . import procs

ROUTERS = ("vllm-router", "sglang-router")


def peer_argv(router: str, binary: str, port: int, *, prefill=(), bootstrap_ports=(),
              decode=(), workers=(), policy: str = "cache_aware") -> list[str]:
    """P/D mode when `prefill` URLs are given (policy for the prefill tier,
    round robin for decode), else plain mode over `workers` with `policy`.
    Both listen on 127.0.0.1 only; their Prometheus exporters (on by default,
    on a fixed port that parallel runs would fight over) get a free loopback
    port."""
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}")
    metrics_port = procs.free_ports(1)[0]
    argv = [binary] + (["launch"] if router == "sglang-router" else [])
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    if not prefill:
        argv += ["--worker-urls", *workers, "--policy", policy]
    elif router == "vllm-router":
        argv.append("--vllm-pd-disaggregation")
        for u in prefill:
            argv += ["--prefill", u]
    else:
        argv.append("--pd-disaggregation")
        for u, bp in zip(prefill, bootstrap_ports):
            argv += ["--prefill", u, str(bp)]
    if prefill:
        for u in decode:
            argv += ["--decode", u]
        argv += ["--prefill-policy", policy, "--decode-policy", "round_robin"]
    if router == "sglang-router":
        argv.append("--disable-health-check")
    return argv
