"""Results on disk: summary.json, requests.jsonl, summary.md and PNG plots."""

from __future__ import annotations

import json
import os

LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"),
             ("E2E", "e2e_ms"))


def _f(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_summary(s: dict) -> str:
    """One run as a Markdown table."""
    lines = [
        f"requests {s['requests']} (completed {s['completed']}, errors {s['errors']}"
        + (f": {', '.join(f'{k} {v}' for k, v in s['error_kinds'].items())}"
           if s["error_kinds"] else "")
        + (f"; not sent {s['not_sent']}" if s.get("not_sent") else "") + ")"
        + f" in {s['duration_s']:.1f} s",
        "",
        "| metric | mean | p50 | p90 | p99 |",
        "|---|---|---|---|---|",
    ]
    for name, key in LATENCIES:
        st = s[key]
        lines.append(f"| {name} (ms) | {_f(st['mean'])} | {_f(st['p50'])} | "
                     f"{_f(st['p90'])} | {_f(st['p99'])} |")
    lines += ["", "| throughput | value |", "|---|---|",
              f"| requests/s | {s['request_throughput']:.2f} |",
              f"| output tokens/s | {s['output_token_throughput']:.1f} |",
              f"| goodput (requests/s within SLO"
              f"{' ' + _slo_text(s['slo']) if s['slo'] else ''}) | {s['goodput']:.2f} |"]
    if s.get("prefix_cache_hit_rate") is not None:
        lines.append(f"| prefix-cache hit rate (simulator) | "
                     f"{100 * s['prefix_cache_hit_rate']:.1f}% |")
    tok = (s.get("sim") or {}).get("tokens") or {}
    if tok.get("given_as_ids") or tok.get("tokenized"):
        lines.append(f"| prompt tokens the engines tokenized / got as ids (simulator) | "
                     f"{tok['tokenized']} / {tok['given_as_ids']} |")
    if tok.get("id_lists_checked"):
        lines.append(f"| forwarded id lists that differ from the engine's own "
                     f"tokenization (simulator) | {tok['id_lists_differing']} of "
                     f"{tok['id_lists_checked']} |")
    for role, sp in (s.get("sim") or {}).get("load_spread", {}).items():
        lines.append(f"| {role} load spread, requests max/mean | "
                     f"{_f(sp['requests_max_over_mean'], 2)} |")
    return "\n".join(lines) + "\n"


def _slo_text(slo: dict) -> str:
    return ", ".join(f"{k[:-3]} <= {v:g} ms" for k, v in slo.items())


COMPARE_COLUMNS = (
    ("target", lambda s: s["label"]),
    ("ok/err", lambda s: f"{s['completed']}/{s['errors']}"),
    ("req/s", lambda s: _f(s["request_throughput"], 2)),
    ("out tok/s", lambda s: _f(s["output_token_throughput"], 0)),
    ("goodput", lambda s: _f(s["goodput"], 2)),
    ("SLO met", lambda s: "-" if s.get("slo_attainment") is None
        else f"{100 * s['slo_attainment']:.1f}%"),
    ("TTFT mean", lambda s: _f(s["ttft_ms"]["mean"], 0)),
    ("TTFT p99", lambda s: _f(s["ttft_ms"]["p99"], 0)),
    ("TPOT mean", lambda s: _f(s["tpot_ms"]["mean"], 1)),
    ("TPOT p99", lambda s: _f(s["tpot_ms"]["p99"], 1)),
    ("E2E p99", lambda s: _f(s["e2e_ms"]["p99"], 0)),
    ("cache hit", lambda s: "-" if s.get("prefix_cache_hit_rate") is None
        else f"{100 * s['prefix_cache_hit_rate']:.1f}%"),
    ("prefill spread", lambda s: _f(_spread(s, "prefill"), 2)),
    ("decode spread", lambda s: _f(_spread(s, "decode"), 2)),
)


def _spread(s, role):
    """Requests per instance, max/mean, for a tier ("both" instances of a
    one-tier cluster count as the prefill tier)."""
    spread = (s.get("sim") or {}).get("load_spread", {})
    tier = spread.get(role) or (spread.get("both") if role == "prefill" else None)
    return (tier or {}).get("requests_max_over_mean")


def markdown_compare(summaries: list[dict], bounds: dict | None = None) -> str:
    """Targets side by side, one row each (latencies in ms); with `bounds`
    (bound.compute), the clairvoyant schedules as rows below them and every
    row's TTFT as multiples of theirs."""
    head = [c for c, _ in COMPARE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        lines.append("| " + " | ".join(str(fn(s)) for _, fn in COMPARE_COLUMNS) + " |")
    if bounds:
        for b in bounds["policies"].values():
            cells = {"target": b["label"], "ok/err": f"{bounds['requests']}/0",
                     "TTFT mean": _f(b["ttft_ms"]["mean"], 0),
                     "TTFT p99": _f(b["ttft_ms"]["p99"], 0)}
            lines.append("| " + " | ".join(cells.get(c, "-") for c in head) + " |")
        lines += ["", markdown_bound_multiples(summaries, bounds).rstrip("\n")]
    return "\n".join(lines) + "\n"


def markdown_bound_multiples(summaries: list[dict], bounds: dict) -> str:
    """Each row's mean and p99 TTFT as multiples of the bounds', and where
    the bounds come from."""
    from .bound import SHORT, multiples
    pols = list(bounds["policies"])
    lines = [f"Bounds: the same {bounds['requests']} completed requests of the "
             f"{bounds['source']} row, its arrival times and the cache hits the simulator "
             f"reported for it, scheduled offline by a clairvoyant central queue on "
             f"{bounds['cluster']} (docs/benchmarking.md). TTFT as multiples of "
             f"the bounds':", "",
             "| target | " + " | ".join(f"mean / {SHORT[p]}" for p in pols) + " | "
             + " | ".join(f"p99 / {SHORT[p]}" for p in pols) + " |",
             "|" + "---|" * (1 + 2 * len(pols))]
    for s in summaries:
        m = multiples(s, bounds)
        lines.append(f"| {s['label']} | " + " | ".join(
            _f(m[f"{stat}/{p}"], 2) for stat in ("mean", "p99") for p in pols) + " |")
    for note in bounds.get("notes") or ():
        lines.append(f"\nNote: {note}.")
    return "\n".join(lines) + "\n"


def markdown_proxy_reports(summaries: list[dict]) -> str:
    """What Omni Proxy targets said about themselves after the run (from
    /omni/status): not measured by the benchmark, shown apart."""
    rows = [s for s in summaries if s.get("proxy_report")]
    if not rows:
        return ""
    lines = ["Omni Proxy's own report after the run (/omni/status, not measured by the "
             "benchmark):", "",
             "| target | decisions | decision µs (mean) | prefill completion MAPE | "
             "prefill service MAPE | held | released by starvation timeout | "
             "cached tokens predicted | predicted, not found by the engine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        r = s["proxy_report"]
        pred = r.get("cache_predicted", 0)
        missing = (f"{r.get('cache_missing', 0)} "
                   f"({100 * r.get('cache_missing', 0) / pred:.2f}%)" if pred else "-")
        lines.append(f"| {s.get('label', s.get('target', '?'))} | {r['decisions']} | "
                     f"{r['decision_us_mean']:.1f} | {r['completion_mape']:.3f} | "
                     f"{r['service_mape']:.3f} | {r['held']} | {r['starved']} | "
                     f"{pred} | {missing} |")
    return "\n".join(lines) + "\n"


def write_run(out_dir: str, summary: dict, records) -> dict:
    """summary.json, requests.jsonl and summary.md; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"summary": os.path.join(out_dir, "summary.json"),
             "requests": os.path.join(out_dir, "requests.jsonl"),
             "table": os.path.join(out_dir, "summary.md")}
    with open(paths["summary"], "w") as f:
        json.dump(summary, f, indent=2, sort_keys=False)
        f.write("\n")
    with open(paths["requests"], "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    with open(paths["table"], "w") as f:
        f.write(markdown_summary(summary))
    return paths


# --- plots ------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ttft_cdf(runs: dict, path: str) -> str:
    """runs: label -> list of RequestRecord."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, records in runs.items():
        v = sorted(r.ttft_ms for r in records if r.ok and r.ttft_ms is not None)
        if v:
            ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=label)
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_latency_over_time(runs: dict, path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for label, records in runs.items():
        ok = [r for r in records if r.ok]
        axes[0].scatter([r.start_s for r in ok], [r.ttft_ms for r in ok], s=4,
                        label=label, alpha=0.6)
        axes[1].scatter([r.start_s for r in ok], [r.e2e_ms for r in ok], s=4,
                        label=label, alpha=0.6)
        bad = [r for r in records if not r.ok and r.start_s is not None]
        if bad:
            axes[1].scatter([r.start_s for r in bad], [r.e2e_ms or 0 for r in bad],
                            s=10, marker="x", label=f"{label} errors")
    axes[0].set_ylabel("TTFT (ms)")
    axes[1].set_ylabel("E2E (ms)")
    axes[1].set_xlabel("request sent at (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_instance_load(runs: dict, path: str) -> str | None:
    """runs: label -> list of /sim/stats samples. One panel per run: waiting +
    running per instance over time."""
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.6 * len(runs) + 0.6),
                             sharex=True, squeeze=False)
    for ax, (label, samples) in zip(axes[:, 0], runs.items()):
        names = []
        for s in samples:
            for i in s["instances"]:
                if i["name"] not in names:
                    names.append(i["name"])
        for name in names:
            pts = [(s["t"], i["waiting"] + i["running"]) for s in samples
                   for i in s["instances"] if i["name"] == name]
            role = next((i["role"] for s in samples for i in s["instances"]
                         if i["name"] == name), "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts],
                    label=f"{name} ({role})", linestyle="--" if role == "decode" else "-")
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("waiting + running")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(out_dir: str, runs: dict, samples: dict) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    out = [plot_ttft_cdf(runs, os.path.join(out_dir, "ttft_cdf.png")),
           plot_latency_over_time(runs, os.path.join(out_dir, "latency_over_time.png"))]
    p = plot_instance_load(samples, os.path.join(out_dir, "instance_load.png"))
    if p:
        out.append(p)
    return out
