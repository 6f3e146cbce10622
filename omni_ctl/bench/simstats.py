"""Ground truth from the simulator's `GET /sim/stats` (docs/internals.md).

Any instance's URL gives the whole cluster. The benchmark reads it before and
after a run (counters -> deltas: prefix-cache hit rate, requests per instance)
and samples it during the run (waiting/running per instance over time).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from .errors import BenchError

COUNTERS = ("requests_total", "requests_finished", "errors_total",
            "prompt_tokens_total", "generation_tokens_total",
            "prefix_cache_queried_tokens", "prefix_cache_hit_tokens",
            # token-id reuse: prompt tokens the engines tokenized, those they
            # got as ids, and the id lists checked against their own
            # tokenization / found to differ (docs/simulator.md)
            "tokenized_tokens_total", "tokenize_skipped_tokens_total",
            "token_parity_checked_total", "sim:token_parity_mismatch_total")


def stats_url(url: str) -> str:
    url = url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/sim/stats") else url + "/sim/stats"


async def fetch(http: aiohttp.ClientSession, url: str) -> dict:
    u = stats_url(url)
    try:
        async with asyncio.timeout(5):
            async with http.get(u) as resp:
                if resp.status != 200:
                    raise BenchError(f"--sim-stats {url}: GET {u} answered {resp.status}")
                data = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise BenchError(f"--sim-stats {url}: GET {u} failed: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cluster"), list):
        raise BenchError(f"--sim-stats {url}: {u} has no 'cluster' list")
    return data


class Sampler:
    """Polls /sim/stats every `interval` seconds until stopped."""

    def __init__(self, http, url, interval):
        self.http, self.url, self.interval = http, stats_url(url), interval
        self.samples: list[dict] = []
        self._task = None

    def start(self, t0: float):
        self._task = asyncio.create_task(self._loop(t0))

    async def _loop(self, t0):
        while True:
            try:
                async with asyncio.timeout(max(self.interval, 1.0)):
                    async with self.http.get(self.url) as resp:
                        data = await resp.json(content_type=None)
                now = time.perf_counter() - t0
                self.samples.append({"t": now, "instances": [
                    {"name": i.get("name"), "role": i.get("role"),
                     "waiting": i.get("waiting", 0), "running": i.get("running", 0),
                     "kv_usage": i.get("kv_usage")}
                    for i in data.get("cluster", [])]})
            except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
                pass        # a missed sample is a gap in a plot, not an error
            await asyncio.sleep(self.interval)

    async def stop(self) -> list[dict]:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.samples


def _key(inst: dict) -> str:
    return str(inst.get("name") or inst.get("url"))


def cluster_summary(before: dict, after: dict, samples: list[dict]) -> dict:
    """Per-instance deltas over the run, the prefix-cache hit rate of the
    instances that prefill (all of them when no instance is prefill-only), and
    how evenly load was spread (max/mean across instances of a role)."""
    old = {_key(i): i for i in before.get("cluster", [])}
    inst_rows = []
    for inst in after.get("cluster", []):
        prev = old.get(_key(inst), {})
        row = {"name": _key(inst), "role": inst.get("role"),
               "engine": inst.get("engine"), "url": inst.get("url")}
        for c in COUNTERS:
            row[c] = (inst.get(c) or 0) - (prev.get(c) or 0)
        row["max_waiting_seen"] = inst.get("max_waiting_seen")
        row["max_running_seen"] = inst.get("max_running_seen")
        inst_rows.append(row)

    # time-averaged queue (waiting + running) per instance from the samples
    for row in inst_rows:
        loads = [i["waiting"] + i["running"] for s in samples for i in s["instances"]
                 if i["name"] == row["name"]]
        row["mean_load"] = sum(loads) / len(loads) if loads else None

    prefill = [r for r in inst_rows if r["role"] != "decode"] or inst_rows
    queried = sum(r["prefix_cache_queried_tokens"] for r in prefill)
    hits = sum(r["prefix_cache_hit_tokens"] for r in prefill)

    spread = {}
    for role in sorted({str(r["role"]) for r in inst_rows}):
        rows = [r for r in inst_rows if str(r["role"]) == role]
        spread[role] = {
            "instances": len(rows),
            "requests_max_over_mean": _max_over_mean([r["requests_total"] for r in rows]),
            "prompt_tokens_max_over_mean":
                _max_over_mean([r["prompt_tokens_total"] for r in rows]),
            "mean_load_max_over_mean":
                _max_over_mean([r["mean_load"] for r in rows if r["mean_load"] is not None]),
        }
    tokens = {k: sum(r[c] for r in inst_rows) for k, c in (
        ("tokenized", "tokenized_tokens_total"),
        ("given_as_ids", "tokenize_skipped_tokens_total"),
        ("id_lists_checked", "token_parity_checked_total"),
        ("id_lists_differing", "sim:token_parity_mismatch_total"))}
    return {"prefix_cache_hit_rate": hits / queried if queried else None,
            "prefix_cache_hit_tokens": hits, "prefix_cache_queried_tokens": queried,
            "tokens": tokens, "load_spread": spread, "instances": inst_rows}


def _max_over_mean(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else None
