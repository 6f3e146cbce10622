"""The Grafana dashboard over Omni Proxy's Prometheus metrics.

`PANELS` is the one source: `omni-ctl dashboard` prints the dashboard JSON
(import it in Grafana, with a Prometheus data source scraping each proxy's
/metrics), docs/grafana/omni-proxy.json is its committed output, and the
tests check that every metric a panel queries is one the proxy exports.
"""

from __future__ import annotations

import json
import re

import click

# (title, unit, [(PromQL, legend)], kind)
PANELS = [
    ("Requests/s by route and status", "reqps",
     [("sum by (route, status) (rate(omni_requests_total[1m]))", "{{route}} {{status}}")],
     "timeseries"),
    ("Requests in the proxy", "short",
     [("sum(omni_inflight_requests)", "in flight"),
      ("sum by (queue) (omni_queue_waiting)", "held: {{queue}}")], "timeseries"),
    ("Refused and timed out in the queue (per s)", "reqps",
     [("sum(rate(omni_queue_rejected_total[1m]))", "429 queue full"),
      ("sum(rate(omni_queue_timeouts_total[1m]))", "503 queue timeout"),
      ("sum(rate(omni_slo_rejected_total[1m]))", "429 SLO (early)")], "timeseries"),
    ("Requests started, by release reason (per s)", "reqps",
     [("sum by (reason) (rate(omni_released_total[1m]))", "{{reason}}")], "timeseries"),
    ("Held prefill work and the starvation bound", "s",
     [("max(omni_queue_work_seconds)", "held work"),
      ("max(omni_starvation_bound_seconds)", "starvation bound")], "timeseries"),
    ("Shortest-first aging (work forgiven per unit waited)", "short",
     [("min(omni_queue_aging)", "aging")], "timeseries"),
    ("Legs cancelled by fail-fast P/D (per s)", "reqps",
     [("sum(rate(omni_legs_cancelled_total[1m]))", "cancelled")], "timeseries"),
    ("Time to first byte", "s",
     [("histogram_quantile(0.5, sum by (le) (rate(omni_time_to_first_byte_seconds_bucket[1m])))",
       "p50"),
      ("histogram_quantile(0.99, sum by (le) (rate(omni_time_to_first_byte_seconds_bucket[1m])))",
       "p99")], "timeseries"),
    ("Time held in the proxy", "s",
     [("histogram_quantile(0.5, sum by (le) (rate(omni_queue_seconds_bucket[1m])))", "p50"),
      ("histogram_quantile(0.99, sum by (le) (rate(omni_queue_seconds_bucket[1m])))", "p99")],
     "timeseries"),
    ("Prefill leg and whole request", "s",
     [("histogram_quantile(0.99, sum by (le) (rate(omni_prefill_leg_seconds_bucket[1m])))",
       "prefill leg p99"),
      ("histogram_quantile(0.99, sum by (le) (rate(omni_request_seconds_bucket[1m])))",
       "request p99")], "timeseries"),
    ("Legs in flight per instance", "short",
     [("max by (role, instance) (omni_instance_inflight_requests)", "{{role}} {{instance}}")],
     "timeseries"),
    ("Tokens charged per instance", "short",
     [("max by (role, instance) (omni_instance_inflight_tokens)", "{{role}} {{instance}}")],
     "timeseries"),
    ("Leg errors per instance (per s)", "reqps",
     [("sum by (role, instance) (rate(omni_instance_errors_total[1m]))",
       "{{role}} {{instance}}")], "timeseries"),
    ("Tokenizer: tokenized and fallbacks (per s)", "reqps",
     [("sum(rate(omni_tokenized_total[1m]))", "tokenized"),
      ("sum by (reason) (rate(omni_tokenize_fallback_total[1m]))", "fallback: {{reason}}")],
     "timeseries"),
    ("Instances usable", "short",
     [("min by (role, instance) (omni_instance_healthy)", "{{role}} {{instance}}")],
     "state-timeline"),
    ("KV-event agent: instances precise (1) or approximate (0)", "short",
     [("min by (role, instance) (omni_instance_agent_precise)", "{{role}} {{instance}}")],
     "state-timeline"),
    ("KV-event agent: health reported (1 up, 2 down)", "short",
     [("max by (role, instance) (omni_instance_agent_health)", "{{role}} {{instance}}")],
     "state-timeline"),
    ("KV-event agent: index blocks stored and removed (per s)", "short",
     [("sum by (instance) (rate(omni_instance_agent_blocks_stored_total[1m]))",
       "stored {{instance}}"),
      ("sum by (instance) (rate(omni_instance_agent_blocks_removed_total[1m]))",
       "removed {{instance}}")], "timeseries"),
    ("KV-event agent: clears, resyncs, rejected batches (per s)", "short",
     [("sum by (instance) (rate(omni_instance_agent_clears_total[1m]))",
       "clears {{instance}}"),
      ("sum by (instance) (rate(omni_instance_agent_resyncs_total[1m]))",
       "resyncs {{instance}}"),
      ("sum(rate(omni_ingest_rejected_total[1m]))", "rejected batches")], "timeseries"),
    ("KV-event agent: age of the last report", "ms",
     [("max by (role, instance) (omni_instance_agent_update_age_ms)",
       "{{role}} {{instance}}")], "timeseries"),
    ("Prediction check: cached tokens predicted but missing / found but unpredicted "
     "(per s)", "short",
     [("sum by (instance) (rate(omni_instance_cache_missing_tokens_total[1m]))",
       "missing {{instance}}"),
      ("sum by (instance) (rate(omni_instance_cache_unpredicted_tokens_total[1m]))",
       "unpredicted {{instance}}")], "timeseries"),
    ("Engine-reported load", "short",
     [("max by (role, instance) (omni_instance_engine_running)", "running {{instance}}"),
      ("max by (role, instance) (omni_instance_engine_waiting)", "waiting {{instance}}")],
     "timeseries"),
]

_METRIC = re.compile(r"\b(omni_[a-z0-9_]+)")
_HIST_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets, kind) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": kind, "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + k), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for k, (expr, legend) in enumerate(targets)],
        })
    return {
        "title": "Omni Proxy", "uid": "omni-proxy", "schemaVersion": 39,
        "tags": ["omni-proxy", "llm"], "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus", "label": "Prometheus"}]},
        "panels": panels,
    }


def queried_metrics(dash: dict) -> set[str]:
    """Names of the metrics a dashboard's queries read (histogram series
    named by their family)."""
    names = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            for m in _METRIC.findall(t["expr"]):
                names.add(_HIST_SUFFIX.sub("", m))
    return names


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


@click.command(name="dashboard")
def dashboard_cmd():
    """Print the Grafana dashboard JSON (docs/grafana/omni-proxy.json)."""
    click.echo(render(), nl=False)
