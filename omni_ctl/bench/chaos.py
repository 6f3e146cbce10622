"""`omni-ctl chaos`: a trace replay through a router while the simulated
cluster fails on a schedule (5xx answers, refused connections, hangs, streams
that stall or drop mid-way, instances that exit and come back), plus, for Omni
Proxy, a reload and a `kill -9` of one nginx worker during the run.

Each target gets its own fresh cluster and the same schedule. What a client
saw is sorted into one outcome per request:

    ok          a complete answer
    error       a well-formed error: an HTTP error status with a JSON
                {"error": ...} body, or an SSE error event that ends the stream
    closed      the connection closed with no answer (expected only for the
                clients of a worker that was killed)
    hung        no complete answer within the client's deadline
    malformed   anything else: a non-JSON error body, a stream that ends
                without [DONE] or an error event, an answer with no text

and, for Omni Proxy, what its books show once the run is over (every
in-flight counter, queue and predictor job should be back at zero).

This is an instrument: it drives the proxy through its CLI and HTTP only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import threading
import time
import urllib.request

from . import core, omni, procs, report
from .compare import Skip, check_available, engine_for, spec_for, start_router, _cluster
from .errors import BenchError

OUTCOMES = ("ok", "error", "closed", "hung", "malformed")

# The default schedule, in percent of the run's planned span (the trace's
# arrival span after --speedup). Every fault the simulator has appears once;
# each instance gets back to normal before the end.
DEFAULT_SCHEDULE = (
    "8%:prefill-0=error,status=500;"
    "22%:prefill-0=none;"
    "12%:prefill-1=exit;"
    "30%:prefill-1=none;"
    "26%:decode-0=stall,after_tokens=3;"
    "36%:decode-0=none;"
    "40%:prefill-2=hang;"
    "48%:prefill-2=none;"
    "50%:reload;"
    "55%:decode-1=drop,after_tokens=2;"
    "62%:decode-1=none;"
    "66%:prefill-3=error,status=503,rate=0.5;"
    "72%:prefill-3=none;"
    "70%:kill-worker;"
    "76%:decode-2=exit;"
    "86%:decode-2=none"
)

PROXY_ACTIONS = ("reload", "kill-worker")


@dataclasses.dataclass
class Action:
    at_s: float
    kind: str                     # "fault", "reload", "kill-worker"
    instance: str | None = None
    fault: dict | None = None
    text: str = ""


def parse_schedule(text: str, span_s: float) -> list[Action]:
    """`T:WHAT;...` with T in seconds (`12`, `12s`) or percent of `span_s`
    (`30%`) and WHAT one of `reload`, `kill-worker` or
    `INSTANCE=MODE[,key=value...]` (the simulator's fault modes)."""
    from omni_ctl.sim.faults import Fault, FaultError
    actions = []
    for item in (p.strip() for p in text.split(";")):
        if not item:
            continue
        when, sep, what = item.partition(":")
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(%|s)?\s*", when)
        if not sep or not m:
            raise BenchError(f"--schedule: '{item}' is not TIME:ACTION "
                             f"(TIME like 12s or 30%)")
        value = float(m.group(1))
        at = value / 100.0 * span_s if m.group(2) == "%" else value
        what = what.strip()
        if what in PROXY_ACTIONS:
            actions.append(Action(at, what, text=item))
            continue
        try:
            name, fault = Fault.parse_flag(what)
        except FaultError as exc:
            raise BenchError(f"--schedule: '{item}': {exc}") from None
        actions.append(Action(at, "fault", name, fault.as_dict(), text=item))
    actions.sort(key=lambda a: a.at_s)
    return actions


def classify(rec) -> str:
    """One outcome per request (see the module's docstring)."""
    if rec.ok:
        return "ok"
    kind = rec.error_kind or ""
    if kind == "timeout":
        return "hung"
    if kind in ("connect", "disconnect"):
        return "closed"
    if kind == "stream_error":
        return "error"
    if kind.startswith("http_"):
        return "error" if rec.error_json else "malformed"
    return "malformed"


def _post_json(url: str, body: dict, timeout: float = 5.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def nginx_workers(prefix: str) -> list[int]:
    """Worker pids of the nginx master whose pid file is in `prefix`."""
    with open(os.path.join(prefix, "nginx.pid")) as f:
        master = int(f.read().strip())
    kids = []
    for task in os.listdir(f"/proc/{master}/task"):
        try:
            with open(f"/proc/{master}/task/{task}/children") as f:
                kids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return kids


class Injector:
    """Carries out a schedule against a running cluster (and proxy) in a
    thread; records what it did and when, on the benchmark's clock."""

    def __init__(self, actions, sim, proxy=None, log=None):
        self.actions = actions
        self.sim = sim
        self.proxy = proxy
        self.log = log or (lambda m: None)
        self.done: list[dict] = []
        self._stop = threading.Event()
        self._thread = None
        self._dead: set[str] = set()
        self._names = self._instance_names()

    def _instance_names(self) -> dict[str, str]:
        """instance name -> its base URL, from the simulator's own stats."""
        st = _get_json(self.sim.urls[0] + "/sim/stats")
        return {i["name"]: i["url"].rstrip("/") for i in st.get("cluster", [])}

    def start(self, t0: float):
        self._thread = threading.Thread(target=self._run, args=(t0,), daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)

    def _control_url(self, target: str) -> str:
        """A live instance to send a fault to (a dead one cannot answer)."""
        for name, url in self._names.items():
            if name != target and name not in self._dead:
                return url
        return self._names.get(target) or self.sim.urls[0]

    def _run(self, t0: float):
        for a in self.actions:
            delay = a.at_s - (time.perf_counter() - t0)
            if delay > 0 and self._stop.wait(delay):
                return
            at = time.perf_counter() - t0
            try:
                what = self._apply(a)
                ok = True
            except Exception as exc:      # recorded, the run goes on
                what, ok = f"failed: {type(exc).__name__}: {exc}", False
            self.done.append({"at_s": round(at, 3), "action": a.text, "ok": ok,
                              "result": what})
            self.log(f"[chaos] t={at:6.1f}s {a.text}: {what}")

    def _apply(self, a: Action) -> str:
        if a.kind == "fault":
            if a.instance not in self._names:
                raise BenchError(f"no instance named {a.instance!r} "
                                 f"(have {', '.join(self._names)})")
            body = dict(a.fault, instance=a.instance)
            _post_json(self._control_url(a.instance) + "/sim/fault", body)
            if a.fault["mode"] == "exit":
                self._dead.add(a.instance)
            else:
                self._dead.discard(a.instance)
            return f"{a.instance} -> {a.fault['mode']}"
        if self.proxy is None or not isinstance(self.proxy, omni.OmniProxy):
            return "skipped (not Omni Proxy)"
        if a.kind == "reload":
            res = omni._omni_ctl("reload", "--nginx-conf-file", self.proxy.conf)
            if res.returncode != 0:
                raise BenchError((res.stderr or res.stdout).strip())
            return "reloaded"
        if a.kind == "kill-worker":
            pids = nginx_workers(self.proxy.prefix)
            if not pids:
                raise BenchError("no nginx worker found")
            os.kill(pids[0], signal.SIGKILL)
            return f"killed worker {pids[0]}"
        raise BenchError(f"unknown action {a.kind}")


def _is_counter(key: str) -> bool:
    return any(w in key for w in ("inflight", "in_flight", "prefilling", "pending",
                                  "waiting", "jobs"))


def proxy_residue(url: str, settle_s: float = 15.0) -> dict | None:
    """Omni Proxy's books after the run: every in-flight counter, queue
    length, `prefilling` and predictor job figure that is not zero (waits up
    to settle_s for them to drain). None when /omni/status cannot be read."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            st = _get_json(url + "/omni/status")
        except (OSError, ValueError):
            return None
        left = {}

        def walk(obj, path):
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        if _is_counter(k) and v:
                            left[f"{path}{k}"] = v
                    else:
                        walk(v, f"{path}{k}.")
            elif isinstance(obj, list):
                for i, v in enumerate(obj):
                    label = (f"{v.get('role', '')}{v.get('index', i)}."
                             if isinstance(v, dict) else f"{i}.")
                    walk(v, path + label)

        walk({k: st.get(k) for k in ("queues", "totals", "instances")}, "")
        if not left or time.monotonic() >= deadline:
            return {"nonzero": left, "zero": not left}
        time.sleep(0.5)


def outcome_table(records) -> dict:
    counts = {o: 0 for o in OUTCOMES}
    kinds: dict[str, dict[str, int]] = {o: {} for o in OUTCOMES if o != "ok"}
    for r in records:
        o = classify(r)
        counts[o] += 1
        if o != "ok":
            k = r.error_kind or "?"
            kinds[o][k] = kinds[o].get(k, 0) + 1
    counts["sent"] = len(records)
    return {"counts": counts, "kinds": kinds}


def markdown_chaos(rows: list[dict]) -> str:
    head = ("| target | sent | ok | error (well-formed) | closed | hung | malformed "
            "| error kinds | books after the run |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        c, k = row["outcomes"]["counts"], row["outcomes"]["kinds"]
        kinds = ", ".join(f"{n} {kk}" for o in ("error", "closed", "hung", "malformed")
                          for kk, n in sorted(k[o].items())) or "-"
        res = row.get("residue")
        books = ("n/a" if res is None else "all zero" if res["zero"] else
                 "; ".join(f"{key}={v}" for key, v in sorted(res["nonzero"].items())[:8]))
        lines.append(f"| {row['label']} | {c['sent']} | {c['ok']} | {c['error']} | "
                     f"{c['closed']} | {c['hung']} | {c['malformed']} | {kinds} | {books} |")
    return head + "\n".join(lines) + "\n"


def plot_errors(rows: list[dict], path: str, bucket_s: float = 2.0) -> str | None:
    """Errors over time (by when the request was sent), one panel per
    target, with the schedule's actions as vertical lines."""
    plt = report._plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        recs = row["records"]
        end = max([r.start_s or 0 for r in recs] + [1.0])
        n = int(end // bucket_s) + 1
        for outcome in ("error", "closed", "hung", "malformed"):
            ys = [0] * n
            for r in recs:
                if classify(r) == outcome and r.start_s is not None:
                    ys[int(r.start_s // bucket_s)] += 1
            if any(ys):
                ax.step([i * bucket_s for i in range(n)], ys, where="post", label=outcome)
        for a in row["actions"]:
            ax.axvline(a["at_s"], color="grey", lw=0.7, ls=":")
            ax.text(a["at_s"], ax.get_ylim()[1] * 0.9, a["action"].split(":", 1)[1],
                    rotation=90, fontsize=6, va="top")
        ax.set_title(row["label"], fontsize=9)
        ax.set_ylabel(f"requests / {bucket_s:g} s")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time the request was sent (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_chaos(targets="omni,vllm-router,sglang-router", prefill=4, decode=4,
              pd_policy="sequential", sim_args="", schedule=DEFAULT_SCHEDULE,
              out_dir="bench-out/chaos", workers=2, quiet=False, log=None,
              omni_args="", **options) -> dict:
    """Run the workload (options as for bench) through every target on a
    fresh cluster with the fault schedule; write chaos.json, chaos.md and
    chaos_errors.png under out_dir."""
    import shlex
    from .compare import parse_targets
    log = log or (lambda m: None)
    names = parse_targets(targets, pd_policy)
    spec = core.spec_from_options(options)
    sessions = core.make_workload(spec)
    arrivals = [s.arrival_s for s in sessions if getattr(s, "arrival_s", None) is not None]
    span = (max(arrivals) if arrivals else options.get("max_duration") or 60.0)
    actions = parse_schedule(schedule, span)
    extra_sim = shlex.split(sim_args) if isinstance(sim_args, str) else list(sim_args)
    extra_omni = shlex.split(omni_args) if isinstance(omni_args, str) else list(omni_args)
    options = dict(options)
    options.setdefault("request_timeout", 60.0)
    os.makedirs(out_dir, exist_ok=True)
    rows, skipped = [], []
    for name in names:
        engine = engine_for(name, pd_policy)
        try:
            check_available(name, pd_policy)
            with contextlib.ExitStack() as stack:
                port = procs.free_ports(1)[0]
                sim = stack.enter_context(_cluster(prefill, decode, pd_policy, engine,
                                                   extra_sim))
                url, proc = start_router(name, sim, pd_policy,
                                         os.path.abspath(os.path.join(out_dir, name, "run")),
                                         port, workers, None, extra_omni)
                stack.callback(proc.stop)
                injector = Injector(actions, sim, proc, log)
                tspec, label = spec_for(name, spec)
                cfg = core.bench_config(url, tspec, options, progress=not quiet,
                                        run_id=f"chaos-{name}")
                cfg.on_start = injector.start
                try:
                    s, result = core.run_bench(cfg, tspec, {}, label=label,
                                               out_dir=os.path.join(out_dir, name),
                                               plots=False)
                finally:
                    injector.stop()
                residue = proxy_residue(url) if name.startswith("omni") else None
                rows.append({"label": label, "target": name, "engine": engine,
                             "outcomes": outcome_table(result.records),
                             "residue": residue, "actions": injector.done,
                             "records": result.records})
        except Skip as exc:
            log(f"[chaos] {name}: skipped: {exc}")
            skipped.append({"target": name, "reason": str(exc)})
    if not rows:
        raise BenchError("no target could run: " + "; ".join(
            f"{s['target']}: {s['reason']}" for s in skipped))
    markdown = markdown_chaos(rows)
    if skipped:
        markdown += "\n" + "\n".join(f"- {s['target']}: skipped: {s['reason']}"
                                     for s in skipped) + "\n"
    plot = plot_errors(rows, os.path.join(out_dir, "chaos_errors.png"))
    out = {"pd_policy": pd_policy, "prefill": prefill, "decode": decode,
           "workload": spec.workload, "schedule": [dataclasses.asdict(a) for a in actions],
           "omni_module": omni.module_label(),
           "rows": [{k: v for k, v in r.items() if k != "records"} for r in rows],
           "skipped": skipped, "plot": plot}
    with open(os.path.join(out_dir, "chaos.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(out_dir, "chaos.md"), "w") as f:
        f.write(markdown)
    out["markdown"] = markdown
    return out
