"""`omni-ctl compare` and `omni-ctl demo`: one workload through several
routers, each in front of its own freshly started simulated cluster (so every
target starts with cold caches and idle instances), side by side.

Targets:
    omni, omni-cache-aware, omni-least-loaded, omni-round-robin
                   Omni Proxy with that --schedule-policy ("omni" is the default)
    nginx-rr       plain nginx round robin (one-tier clusters: --pd-policy aggregated)
    vllm-router    vllm-router, P/D (--vllm-pd-disaggregation) with cache_aware
                   prefill policy; plain cache_aware when aggregated
    sglang-router  sglang-router, P/D (--pd-disaggregation, SGLang engines) with
                   cache_aware prefill policy; plain cache_aware when aggregated
    oracle         the simulator's own oracle router (`omni-ctl sim --oracle-port`):
                   it reads every instance's exact cache and queue; the
                   yardstick for prefix-cache hit rate
    omni-events    omni with the engines' KV events, /metrics and /health
                   (the simulator publishes with --kv-events, for every
                   target of the comparison; `omni-ctl start` runs
                   `omni-ctl agent`); no --cache-blocks needed
    omni-x2, omni-events-x2
                   two Omni Proxy replicas, each with its own zone (and agent),
                   behind a plain nginx that splits the traffic evenly
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import time

from . import bound, core, omni, peers, procs, report
from .errors import BenchError

OMNI_POLICIES = ("omni", "cache-aware", "least-loaded", "round-robin")
TARGETS = ("omni", "omni-cache-aware", "omni-least-loaded", "omni-round-robin",
           "nginx-rr", "vllm-router", "sglang-router", "oracle",
           "omni-events", "omni-x2", "omni-events-x2")
# not run unless asked for: the oracle shares the simulator's core with the
# engines; the others are variants of `omni` for the KV-event benchmark
NOT_DEFAULT = ("oracle", "omni-events", "omni-x2", "omni-events-x2")
# the engines' publishers relative to their HTTP port (`omni-ctl sim`)
EVENT_ARGS = ("--kv-events-port-offset", "100", "--kv-replay-port-offset", "200")


def omni_variant(target: str):
    """(schedule policy, with engine events, replicas) of an omni target."""
    name, replicas = target, 1
    if name.endswith("-x2"):
        name, replicas = name[:-3], 2
    events = name == "omni-events"
    if events or name == "omni":
        return "omni", events, replicas
    return name[len("omni-"):], events, replicas


class Skip(Exception):
    """A target that cannot run here; the message says why."""


def parse_targets(text: str | None, pd_policy: str) -> list[str]:
    if not text:
        names = [t for t in TARGETS if (t != "nginx-rr" or pd_policy == "aggregated")
                 and t not in NOT_DEFAULT]
        return names
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise BenchError(f"--targets: unknown '{','.join(bad) or text}' "
                         f"(known: {', '.join(TARGETS)})")
    return names


def engine_for(target: str, pd_policy: str) -> str:
    """The simulated engine a target needs: SGLang's protocol for parallel P/D
    (and for sglang-router in P/D mode), vLLM's otherwise."""
    if pd_policy == "aggregated":
        return "vllm"
    if target == "sglang-router":
        return "sglang"
    if target == "vllm-router":
        return "vllm"
    return "sglang" if pd_policy == "parallel" else "vllm"


def _cluster(prefill: int, decode: int, pd_policy: str, engine: str, sim_args):
    try:
        from omni_ctl.sim.cluster import SimCluster
    except ImportError as exc:
        raise BenchError(f"the simulator (omni_ctl.sim.cluster) is not in this build: "
                         f"{exc}") from None
    if pd_policy == "aggregated":
        return SimCluster(prefill=0, decode=0, both=prefill + decode, engine=engine,
                          args=sim_args)
    return SimCluster(prefill=prefill, decode=decode, engine=engine, args=sim_args)


class _InSim:
    """The oracle lives in the simulator's process: nothing of its own to stop."""

    def stop(self):
        pass


class _Group:
    """Proxy replicas and the plain nginx in front of them, stopped together
    (the front first); `ports` are the replicas' own."""

    def __init__(self, procs_, ports):
        self.procs, self.ports = procs_, ports
        self.name = "omni replicas"
        self.log_path = " ".join(p.log_path for p in procs_)
        self.popen = procs_[-1].popen if hasattr(procs_[-1], "popen") else None

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs)

    def log_tail(self, n: int = 2000) -> str:
        return "\n".join(p.log_tail(n) for p in self.procs)

    def stop(self):
        for p in reversed(self.procs):
            p.stop()


def start_router(target: str, sim, pd_policy: str, prefix: str, port: int,
                 workers: int = 1, omni_module_dir: str | None = None,
                 omni_args=()):
    """Start `target` in front of the running cluster `sim` and wait until it
    answers; return (url, process). The caller stops the process.  `prefix`
    is the run's own directory: what an earlier run left there goes first
    (nginx appends to an access log, and `omni-ctl explain` read two runs'
    requests as one)."""
    shutil.rmtree(prefix, ignore_errors=True)
    os.makedirs(prefix, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    if target == "oracle":
        return sim.oracle_url, _InSim()
    if target.startswith("omni"):
        policy, events, replicas = omni_variant(target)
        extra = list(omni_args) + (list(EVENT_ARGS) if events else [])
        ports = [port] if replicas == 1 else procs.free_ports(replicas)
        procs_ = []
        try:
            for k, p in enumerate(ports):
                procs_.append(omni.start_proxy(
                    prefix if replicas == 1 else os.path.join(prefix, f"replica{k}"),
                    p, pd_policy, workers=workers, prefill=sim.prefill_endpoints,
                    decode=sim.decode_endpoints, schedule_policy=policy,
                    module_dir=omni_module_dir, extra=extra))
            if replicas > 1:
                conf = procs.render_plain_nginx(
                    os.path.join(prefix, "front"), [port], mode="proxy",
                    upstreams=[f"127.0.0.1:{p}" for p in ports])
                procs_.append(procs.start_nginx("front", conf,
                                                os.path.join(prefix, "front")))
        except omni.NotAvailable as exc:
            for p in procs_:
                p.stop()
            raise Skip(str(exc)) from None
        except BaseException:
            for p in procs_:
                p.stop()
            raise
        proc = procs_[0] if replicas == 1 else _Group(procs_, ports)
    elif target == "nginx-rr":
        conf = procs.render_plain_nginx(prefix, [port], mode="proxy", workers=workers,
                                        upstreams=[u.split("//", 1)[1] for u in sim.urls])
        proc = procs.start_nginx(target, conf, prefix)
    else:
        binary = procs.venv_bin(target)
        proc = procs.Proc(target, peer_argv(target, binary, port, sim, pd_policy),
                          os.path.join(prefix, "router.log"))
    try:
        probe = json.dumps({"model": "probe", "prompt": "hello", "max_tokens": 1,
                            "stream": False}).encode()
        procs.wait_http(proc, url + "/v1/completions", probe, timeout=60, what=target)
    except BaseException:
        proc.stop()
        raise
    return url, proc


def peer_argv(target: str, binary: str, port: int, sim, pd_policy: str) -> list[str]:
    """The peer in P/D mode (cache_aware prefill) or, for one-tier clusters,
    plain cache_aware."""
    if pd_policy == "aggregated":
        return peers.peer_argv(target, binary, port, workers=sim.urls)
    return peers.peer_argv(target, binary, port, prefill=sim.prefill_urls,
                           bootstrap_ports=[bp if bp is not None else 8998
                                            for bp in sim.bootstrap_ports],
                           decode=sim.decode_urls)


def proxy_report(url: str, save_to: str | None = None) -> dict | None:
    """Omni Proxy's self-report after a run: scheduling decisions and their
    mean cost, and the predictor's running errors (mean over the prefill
    instances that made predictions). Kept apart from measured numbers.
    `save_to`: also keep the whole /omni/status there (model parameters)."""
    import urllib.request
    try:
        with urllib.request.urlopen(url + "/omni/status", timeout=5) as resp:
            raw = resp.read()
        st = json.loads(raw)
    except (OSError, ValueError):
        return None
    if save_to:
        with open(save_to, "wb") as f:
            f.write(raw)
    sched, queues = st.get("scheduler", {}), st.get("queues", {})
    preds = [i["predictor"] for i in st.get("instances", [])
             if i.get("predictor", {}).get("prefill_samples")]
    mean = (lambda k: sum(p[k] for p in preds) / len(preds)) if preds else (lambda k: 0.0)
    checks = [i.get("cache_check", {}) for i in st.get("instances", [])]
    csum = (lambda k: sum(c.get(k, 0) for c in checks))
    return {"decisions": sched.get("decisions", 0),
            "decision_us_mean": sched.get("decision_us_mean", 0.0),
            "completion_mape": mean("completion_mape"),
            "service_mape": mean("prefill_mape"),
            "held": queues.get("held_total", 0),
            "starved": queues.get("released_by_starvation_timeout", 0),
            "cache_checked": csum("checked"),
            "cache_predicted": csum("predicted"),
            "cache_missing": csum("missing"),
            "cache_unpredicted": csum("unpredicted"),
            "precise": sum(1 for i in st.get("instances", [])
                           if i.get("agent", {}).get("mode") == "precise")}


def merge_reports(reports: list) -> dict | None:
    """One report for proxy replicas: counts summed, means weighted by the
    decisions each replica made."""
    reports = [r for r in reports if r]
    if len(reports) <= 1:
        return reports[0] if reports else None
    out = {}
    n = sum(r["decisions"] for r in reports) or 1
    for k in reports[0]:
        if k in ("decision_us_mean", "completion_mape", "service_mape"):
            out[k] = sum(r[k] * r["decisions"] for r in reports) / n
        else:
            out[k] = sum(r[k] for r in reports)
    out["replicas"] = len(reports)
    return out


# Routers whose /v1/completions takes only text prompts (sglang-router rejects
# token-id prompts with 422).
TEXT_ONLY = ("sglang-router",)


def spec_for(target: str, spec: core.WorkloadSpec):
    """The workload a target gets, and its label: text prompts (the trace's
    text mode) instead of token ids for text-only routers, said in the label."""
    if target in TEXT_ONLY and core.prompt_mode(spec) == "tokens":
        return dataclasses.replace(spec, prompt_mode="text"), f"{target} (text prompts)"
    return spec, target


def check_available(target: str, pd_policy: str) -> None:
    """Raise Skip before a cluster is started for a target that cannot run."""
    if target == "nginx-rr" and pd_policy != "aggregated":
        raise Skip("plain nginx cannot split prefill and decode; it runs with "
                   "--pd-policy aggregated")
    if target in ("vllm-router", "sglang-router") and procs.venv_bin(target) is None:
        raise Skip(f"{target} is not installed (pip install .[peers])")


def sim_args_for(name: str, names: list[str], extra_sim: list[str],
                 port: int) -> list[str]:
    """The simulator's arguments for target `name` of a comparison of
    `names`. When any target hears the engines' KV events, every target's
    simulator publishes them: on this shared machine publishing costs the
    simulated engines CPU (hashing, encoding, ZMQ), and a comparison must
    differ only in the router. Only omni-events targets listen."""
    args = list(extra_sim)
    if name == "oracle":
        args += ["--oracle-port", str(port)]
    if (any(n.startswith("omni-events") for n in names)
            and "--kv-events" not in args):
        args.append("--kv-events")
    return args


def run_compare(targets=None, prefill=2, decode=2, pd_policy="sequential", sim_args="",
                out_dir="bench-out/compare", quiet=False, workers=1, log=None,
                keep_last=False, last_port=0, omni_module_dir=None, omni_args="",
                **options) -> dict:
    """Run one workload (options as for bench) through every target, each on
    a fresh cluster; write compare.json, compare.md, per-target results and
    plots under out_dir. With keep_last, the last target and its cluster are
    left running (returned as result["kept"])."""
    from .metrics import parse_slo
    log = log or (lambda m: None)
    names = parse_targets(targets, pd_policy)
    if prefill < 1 or decode < 1:
        raise BenchError(f"--prefill and --decode must be >= 1, got {prefill}, {decode}")
    spec = core.spec_from_options(options)
    slo = parse_slo(options.get("slo"))
    core.make_workload(spec)         # bad workload options fail before anything starts
    core.arrival_mode(spec, options.get("rate"), options.get("concurrency"))
    extra_sim = shlex.split(sim_args) if isinstance(sim_args, str) else list(sim_args)
    extra_omni = shlex.split(omni_args) if isinstance(omni_args, str) else list(omni_args)
    os.makedirs(out_dir, exist_ok=True)
    summaries, runs, samples, skipped, kept = [], {}, {}, [], None
    simreq = {}
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    for i, name in enumerate(names):
        engine = engine_for(name, pd_policy)
        keep = keep_last and i == len(names) - 1
        try:
            check_available(name, pd_policy)
            with contextlib.ExitStack() as stack:
                port = last_port if keep and last_port else procs.free_ports(1)[0]
                args = sim_args_for(name, names, extra_sim, port)
                sim = stack.enter_context(
                    _cluster(prefill, decode, pd_policy, engine, args))
                url, proc = start_router(
                    name, sim, pd_policy, os.path.abspath(os.path.join(out_dir, name, "run")),
                    port, workers, omni_module_dir, extra_omni)
                stack.callback(proc.stop)
                log(f"[compare] {name}: {url} in front of {engine} cluster "
                    f"{' '.join(sim.urls)}")
                tspec, label = spec_for(name, spec)
                cfg = core.bench_config(url, tspec, options, progress=not quiet,
                                        sim_stats_url=sim.urls[0],
                                        run_id=f"compare-{name}")
                s, result = core.run_bench(cfg, tspec, slo, label=label,
                                           out_dir=os.path.join(out_dir, name),
                                           plots=False)
                s["engine"] = engine
                if name.startswith("omni"):
                    urls = ([url] if not isinstance(proc, _Group) else
                            [f"http://127.0.0.1:{p}" for p in proc.ports])
                    s["proxy_report"] = merge_reports([proxy_report(
                        u, os.path.join(out_dir, name, f"omni_status{k or ''}.json"))
                        for k, u in enumerate(urls)])
                summaries.append(s)
                runs[label], samples[label] = result.records, result.sim_samples
                simreq[label] = (name, result.sim_requests)
                if keep:
                    kept = {"target": name, "url": url, "proc": proc, "sim": sim,
                            "model": result.model, "stack": stack.pop_all()}
            if not keep:
                # what the simulator said (stopped now: its stderr is whole)
                with open(os.path.join(out_dir, name, "sim.log"), "w") as f:
                    f.write(sim.stderr_text())
        except Skip as exc:
            log(f"[compare] {name}: skipped: {exc}")
            skipped.append({"target": name, "reason": str(exc)})
    if not summaries:
        raise BenchError("no target could run: " + "; ".join(
            f"{s['target']}: {s['reason']}" for s in skipped))
    bounds = compare_bounds(summaries, runs, simreq, extra_sim, log)
    if bounds:
        with open(os.path.join(out_dir, "bound.json"), "w") as f:
            json.dump(bounds, f, indent=1)
    markdown = report.markdown_compare(summaries, bounds)
    own = report.markdown_proxy_reports(summaries)
    if own:
        markdown += "\n" + own
    if skipped:
        markdown += "\n" + "\n".join(f"- {s['target']}: skipped: {s['reason']}"
                                     for s in skipped) + "\n"
    plots = report.write_plots(out_dir, runs, samples)
    result = {"started": started, "pd_policy": pd_policy, "prefill": prefill,
              "decode": decode, "workload": spec.workload, "slo": slo,
              "omni_module": omni.module_label(omni_module_dir),
              "omni_args": extra_omni, "sim_args": extra_sim,
              "bounds": bound.brief(bounds) if bounds else None,
              "summaries": summaries, "skipped": skipped, "plots": plots,
              "markdown": markdown, "out_dir": out_dir, "kept": kept}
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k not in ("markdown", "kept")},
                  f, indent=2)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(markdown)
    return result


def bound_source(summaries: list[dict], simreq: dict) -> str | None:
    """The row whose cache hits the bounds take: omni, else another Omni
    policy, else the first row with the simulator's per-request records."""
    labels = [s["label"] for s in summaries if simreq.get(s["label"], (0, None))[1]]
    if "omni" in labels:
        return "omni"
    return next((x for x in labels if x.startswith("omni")), labels[0] if labels else None)


def compare_bounds(summaries, runs, simreq, sim_args, log) -> dict | None:
    """The clairvoyant bounds (bound.py) of the run's requests, or None when
    no row has the simulator's per-request records."""
    label = bound_source(summaries, simreq)
    if label is None:
        log("[compare] no bound: no row has the simulator's per-request records")
        return None
    name, sim = simreq[label]
    try:
        cluster = bound.cluster_for(sim, sim_args)
        return bound.compute(runs[label], sim, f"compare-{name}", cluster, source=label)
    except BenchError as exc:       # the measured rows stand without it
        log(f"[compare] no bound: {exc}")
        return None


# --- demo ---------------------------------------------------------------------------

# A short shared-prefix workload: 32 groups of 4 requests share a 4,096-token
# system prompt. At 24 requests/s, prefilling every prefix on both prefill
# instances (what round robin ends up doing) overloads them; computing each
# prefix once does not.
DEMO_OPTIONS = dict(workload="gsp", gsp_groups=32, gsp_prompts_per_group=4,
                    gsp_system_len=4096, gsp_question_len=64, gsp_output_len=32,
                    rate=24.0, slo="ttft=500ms,tpot=50ms", max_duration=60.0,
                    request_timeout=30.0)
DEMO_SHORT = dict(DEMO_OPTIONS, gsp_groups=4, gsp_prompts_per_group=4,
                  gsp_system_len=1024, gsp_output_len=8, max_duration=20.0)


def run_demo(short=False, keep=False, out_dir="demo-out", port=0, quiet=False,
             log=None) -> dict:
    """2 prefill + 2 decode simulated instances; Omni Proxy with round robin,
    then with its own policy, on the same workload."""
    options = dict(DEMO_SHORT if short else DEMO_OPTIONS)
    res = run_compare(targets="omni-round-robin,omni", prefill=2, decode=2,
                      pd_policy="sequential", sim_args="", out_dir=out_dir,
                      quiet=quiet, log=log, keep_last=keep, last_port=port, **options)
    notes = [f"plots: {', '.join(res['plots'])}",
             f"results: {os.path.join(out_dir, 'compare.json')}"]
    kept = res["kept"]
    if kept:
        notes += keep_notes(kept)
    return {"markdown": res["markdown"], "notes": notes, "result": res}


def keep_notes(kept: dict) -> list[str]:
    url, model, sim = kept["url"], kept["model"], kept["sim"]
    conf = getattr(kept["proc"], "conf", None)
    body = json.dumps({"model": model, "prompt": "Say hello", "max_tokens": 16,
                       "stream": True})
    return [
        "",
        f"Omni Proxy is running at {url} in front of the simulated cluster "
        f"(pid {sim.pid}: {' '.join(sim.urls)}).",
        "Send a request:",
        f"  curl -N {url}/v1/completions -H 'Content-Type: application/json' "
        f"-d '{body}'",
        "With the openai client (pip install openai):",
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', "
        f"api_key='none'); print(c.completions.create(model='{model}', "
        f"prompt='Say hello', max_tokens=16).choices[0].text)\"",
        f"Status: curl {url}/omni/status",
        "Stop them:",
        f"  {('.venv/bin/omni-ctl stop --nginx-conf-file ' + conf) if conf else 'kill ' + str(kept['proc'].pid)}",
        f"  kill {sim.pid}",
    ]
