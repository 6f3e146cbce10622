"""click commands: bench, compare, bench-overhead, demo (thin over plain functions)."""

from __future__ import annotations

import json

import click


def _rate(ctx, param, value):
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a number (or 'inf')") from None
    if not v > 0:
        raise click.BadParameter(f"must be > 0 (or 'inf'), got {value}")
    return v


def _extra_body(ctx, param, value):
    if not value:
        return {}
    try:
        v = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"'{value}' is not JSON: {exc}") from None
    if not isinstance(v, dict):
        raise click.BadParameter(f"'{value}' must be a JSON object")
    return v


def workload_options(f):
    """Options that decide what is sent; shared by bench, compare and demo."""
    opts = [
        click.option("--workload", "-w", default="gsp", show_default=True,
                     help="gsp | multiturn | random | trace:PATH (Mooncake JSONL) | "
                          "trace:mooncake (the shipped Mooncake trace)."),
        click.option("--num-requests", "-n", type=int, default=None,
                     help="Requests to send (default: the whole trace, all gsp "
                          "groups, else 200)."),
        click.option("--prompt-mode", type=click.Choice(["auto", "tokens", "text"]),
                     default="auto", show_default=True,
                     help="Token-id or text prompts (auto: tokens for traces on "
                          "/v1/completions, else text)."),
        click.option("--endpoint", type=click.Choice(["completions", "chat"]),
                     default="completions", show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--speedup", type=float, default=1.0, show_default=True,
                     help="Trace replay: timestamps are divided by this."),
        click.option("--gsp-groups", type=int, default=8, show_default=True),
        click.option("--gsp-prompts-per-group", type=int, default=16, show_default=True),
        click.option("--gsp-system-len", type=int, default=2048, show_default=True,
                     help="Shared system prompt, tokens."),
        click.option("--gsp-question-len", type=int, default=128, show_default=True),
        click.option("--gsp-output-len", type=int, default=128, show_default=True),
        click.option("--mt-turns", type=int, default=4, show_default=True),
        click.option("--mt-system-len", type=int, default=512, show_default=True),
        click.option("--mt-user-len", type=int, default=128, show_default=True),
        click.option("--mt-output-len", type=int, default=128, show_default=True),
        click.option("--random-input-len", type=int, default=1024, show_default=True),
        click.option("--random-output-len", type=int, default=128, show_default=True),
        click.option("--random-range-ratio", type=float, default=0.0, show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def load_options(f):
    """Options that decide when and how requests are sent."""
    opts = [
        click.option("--rate", callback=_rate, default=None,
                     help="Open loop: Poisson arrivals per second ('inf': all at once)."),
        click.option("--concurrency", "-c", type=int, default=None,
                     help="Closed loop: requests in flight (default 16 unless "
                          "--rate or a trace)."),
        click.option("--max-duration", type=float, default=600.0, show_default=True,
                     help="Hard stop in seconds; requests still running are "
                          "cancelled and counted."),
        click.option("--request-timeout", type=float, default=300.0, show_default=True,
                     help="Per-request limit in seconds."),
        click.option("--slo", default=None,
                     help="Goodput SLOs, e.g. ttft=2s,tpot=50ms (ttft, tpot, e2e)."),
        click.option("--stream/--no-stream", default=True, show_default=True),
        click.option("--model", default=None,
                     help="Model name (default: the first of /v1/models, else 'default')."),
        click.option("--extra-body", callback=_extra_body, default=None,
                     help="JSON object merged into every request body."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command(name="bench")
@click.option("--target", required=True, help="Base URL, e.g. http://127.0.0.1:8080")
@workload_options
@load_options
@click.option("--sim-stats", "sim_stats", default=None,
              help="A simulator instance URL: adds prefix-cache hit rate and "
                   "per-instance load from /sim/stats.")
@click.option("--sim-interval", type=float, default=0.5, show_default=True,
              help="Seconds between /sim/stats samples.")
@click.option("--engine-metrics", default="",
              help="Comma list of engine base URLs (prefill instances): the "
                   "prefix-cache hit rate from their own /metrics (vLLM "
                   "prefix_cache_hits/queries, SGLang cache_hit_rate).")
@click.option("--sim-args", default="",
              help="With --sim-stats and a trace: the options the simulator was "
                   "started with, for the bound's engine limits (its preset and "
                   "speedup are read from /sim/stats).")
@click.option("--label", default=None, help="Name of this run in tables and plots.")
@click.option("--out", "out_dir", default="bench-out", show_default=True,
              help="Directory for summary.json, requests.jsonl, summary.md, plots.")
@click.option("--plots/--no-plots", default=True, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
def bench(target, sim_stats, sim_interval, engine_metrics, sim_args, label, out_dir,
          plots, quiet, **kw):
    """Load-test an OpenAI-compatible endpoint: TTFT, TPOT, ITL, E2E,
    throughput and goodput (definitions: docs/benchmarking.md). With a trace
    and --sim-stats, also the clairvoyant bounds of the same requests."""
    import os
    import shlex
    from . import bound, core, report
    from .metrics import parse_slo
    spec = core.spec_from_options(kw)
    slo = parse_slo(kw["slo"])
    bound.sim_options(shlex.split(sim_args))       # bad ones fail before the run
    cfg = core.bench_config(_url(target), spec, kw, progress=not quiet,
                            sim_stats_url=sim_stats, sim_interval_s=sim_interval)
    summary, result = core.run_bench(cfg, spec, slo, label=label, out_dir=out_dir,
                                     plots=plots,
                                     engine_metrics=[_url(u) for u in engine_metrics.split(",")
                                                     if u.strip()])
    click.echo(report.markdown_summary(summary))
    if spec.workload.startswith("trace:") and result.sim_requests:
        bounds = bound.compute(result.records, result.sim_requests, cfg.run_id,
                               bound.cluster_for(result.sim_requests, shlex.split(sim_args)),
                               source=summary["label"])
        summary["files"]["bound"] = os.path.join(out_dir, "bound.json")
        with open(summary["files"]["bound"], "w") as f:
            json.dump(bounds, f, indent=1)
        click.echo(report.markdown_compare([summary], bounds))
    for name, p in summary["files"].items():
        for path in (p if isinstance(p, list) else [p]):
            click.echo(f"{name}: {path}")


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _url(target: str) -> str:
    target = target.rstrip("/")
    if "://" not in target:
        target = "http://" + target
    return target


@click.command(name="bench-overhead")
@click.option("--sizes", default="1k,16k,200k", show_default=True,
              help="Prompt sizes in bytes (k = 1024).")
@click.option("--targets", default=None,
              help="Comma list (default: all available): " + ", ".join(
                  ["direct", "nginx", "nginx-mirror", "omni-aggregated", "omni-aggregated-ll",
                   "omni-sequential", "omni-parallel", "omni-sequential-tok",
                   "sglang-router-pd",
                   "vllm-router-pd", "sglang-router-rr", "vllm-router-rr",
                   "sglang-router-ca", "vllm-router-ca"]))
@click.option("--duration", type=click.IntRange(1), default=3, show_default=True,
              help="Seconds of load per target, size and round.")
@click.option("--repeat", type=click.IntRange(1), default=3, show_default=True,
              help="Interleaved rounds over all targets; medians are reported.")
@click.option("--connections", type=int, default=32, show_default=True)
@click.option("--wrk-threads", type=int, default=1, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True,
              help="nginx worker processes for plain nginx and Omni Proxy.")
@click.option("--backend-workers", type=int, default=1, show_default=True)
@click.option("--base-port", type=int, default=0,
              help="First loopback port to use (default: free ports).")
@click.option("--out", "out_dir", default="bench-out/overhead", show_default=True)
@click.option("--omni-module-dir", default=None,
              help="Directory of the ngx_http_omni_module.so to measure "
                   "(default: gen-conf's; results record its BUILD_INFO).")
@click.option("--prompt-kind", type=click.Choice(["text", "tokens"]), default="text",
              show_default=True, help="Prompt as a string or as token ids.")
@click.option("--keep-dir", is_flag=True, help="Keep the temporary prefix (configs, logs).")
@click.option("--model-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Tokenizer directory for omni-sequential-tok (and the engine-side "
                   "tokenization it replaces).")
@click.option("--omni-args", default="",
              help="Extra `omni-ctl gen-conf` options for the Omni Proxy targets, "
                   "e.g. '--tokenize-max-inflight 4'.")
def bench_overhead(**kw):
    """Requests/s and p50/p99 of plain nginx, Omni Proxy and peer routers in
    front of one canned fast backend, at several prompt sizes, measured with wrk."""
    from . import overhead
    res = overhead.run_overhead(**kw, log=_log)
    click.echo(res["markdown"])
    click.echo(f"results: {res['json_path']}")
    problems = []
    if res["collapses"]:
        problems.append(f"{len(res['collapses'])} round(s) fell under half of the other "
                        "rounds' median (see COLLAPSE above): a target stalled during "
                        "the run")
    if res.get("leaks"):
        problems.append(f"{len(res['leaks'])} round(s) left an idle Omni Proxy with "
                        "load or predicted prefill work in flight (see LEAK above)")
    if problems:
        raise click.ClickException("; ".join(problems))


@click.command(name="compare")
@click.option("--targets", default=None,
              help="Comma list (default: omni policies, round robin, peers when "
                   "installed); see docs/benchmarking.md.")
@click.option("--prefill", type=int, default=2, show_default=True)
@click.option("--decode", type=int, default=2, show_default=True)
@click.option("--pd-policy", type=click.Choice(["sequential", "parallel", "aggregated"]),
              default="sequential", show_default=True)
@click.option("--sim-args", default="", help="Extra arguments for `omni-ctl sim`.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="nginx worker processes for Omni Proxy and plain nginx.")
@click.option("--omni-module-dir", default=None,
              help="Directory of the ngx_http_omni_module.so to run.")
@click.option("--omni-args", default="",
              help="Extra `omni-ctl gen-conf` options for the Omni Proxy targets, "
                   "e.g. '--prefill-starvation-timeout 10s'.")
@workload_options
@load_options
@click.option("--out", "out_dir", default="bench-out/compare", show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def compare(**kw):
    """Run one workload through several routers, each on a fresh simulated cluster."""
    from . import compare as cmp
    res = cmp.run_compare(**kw, log=_log)
    click.echo(res["markdown"])
    click.echo(f"results: {res['out_dir']}")


@click.command(name="demo")
@click.option("--short", is_flag=True, help="A smaller, faster run (CI).")
@click.option("--keep", is_flag=True,
              help="Leave the cluster and Omni Proxy running; print how to use them.")
@click.option("--out", "out_dir", default="demo-out", show_default=True)
@click.option("--port", type=int, default=0, help="Omni Proxy's port (default: free).")
def demo(short, keep, out_dir, port):
    """Simulated 2 prefill + 2 decode cluster: Omni Proxy vs round robin."""
    from . import compare as cmp
    res = cmp.run_demo(short=short, keep=keep, out_dir=out_dir, port=port, log=_log)
    click.echo(res["markdown"])
    for line in res["notes"]:
        click.echo(line)


@click.command(name="chaos")
@click.option("--targets", default="omni,vllm-router,sglang-router", show_default=True,
              help="Comma list of compare's targets.")
@click.option("--prefill", type=int, default=4, show_default=True)
@click.option("--decode", type=int, default=4, show_default=True)
@click.option("--pd-policy", type=click.Choice(["sequential", "parallel", "aggregated"]),
              default="sequential", show_default=True)
@click.option("--schedule", default=None,
              help="Faults as 'TIME:ACTION;...': TIME in s or % of the run, ACTION "
                   "INSTANCE=MODE[,k=v...] (the simulator's fault modes), reload or "
                   "kill-worker (default: one of every kind, docs/benchmarking.md).")
@click.option("--sim-args", default="", help="Extra arguments for `omni-ctl sim`.")
@click.option("--workers", type=int, default=2, show_default=True,
              help="nginx worker processes for Omni Proxy (kill-worker needs 2).")
@click.option("--omni-args", default="", help="Extra `omni-ctl gen-conf` options.")
@workload_options
@load_options
@click.option("--out", "out_dir", default="bench-out/chaos", show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def chaos(schedule, **kw):
    """Replay a workload through routers while the simulated cluster fails on
    a schedule; count answers, well-formed errors, hangs and malformed ones."""
    from . import chaos as ch
    res = ch.run_chaos(schedule=schedule or ch.DEFAULT_SCHEDULE, **kw, log=_log)
    click.echo(res["markdown"])
    click.echo(f"results: {kw['out_dir']}")


@click.command(name="explain")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--worst", type=click.IntRange(0), default=10, show_default=True,
              help="How many of the slowest requests to list.")
@click.option("--idle-tolerance-ms", type=click.FloatRange(0), default=3.0,
              show_default=True,
              help="Gaps between an instance's prefill legs up to this long do not "
                   "count as idle (the log's millisecond resolution, the hand-off).")
@click.option("--access-log", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The proxy's access log (default: RUN_DIR/run/access.log, where "
                   "compare starts the proxy); for a bench run against a proxy of yours.")
@click.option("--nginx-conf", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The proxy's nginx.conf (default: RUN_DIR/run/nginx.conf).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the per-request attribution as JSON instead.")
def explain(run_dir, worst, idle_tolerance_ms, access_log, nginx_conf, as_json):
    """Attribute each request's TTFT in an Omni Proxy run directory (bench or
    compare output, e.g. bench-out/compare/omni) to waiting, idle instances,
    starvation releases, mispredictions, shared steps, its own prefill, the
    decode leg and overhead (docs/scheduler.md)."""
    from . import explain as ex
    res = ex.explain(run_dir, worst=worst, idle_tolerance_ms=idle_tolerance_ms,
                     access_log=access_log, nginx_conf=nginx_conf)
    if as_json:
        click.echo(json.dumps({k: v for k, v in res.items() if k != "markdown"}, indent=1))
    else:
        click.echo(res["markdown"])
