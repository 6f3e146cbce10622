"""Prefix-cache hit rate from the engines' own Prometheus `/metrics`, so
`omni-ctl bench` measures it against real vLLM or SGLang servers, not only
against the simulator's /sim/stats.

vLLM counts in tokens: `vllm:prefix_cache_queries_total` and
`vllm:prefix_cache_hits_total`; the run's hit rate is the growth of the hits
over the growth of the queries, summed over the engines. SGLang exposes only
`sglang:cache_hit_rate`, a gauge over its recent requests; it is weighted by
the growth of `sglang:prompt_tokens_total` of that engine during the run.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from .errors import BenchError

VLLM_QUERIES = "vllm:prefix_cache_queries"
VLLM_HITS = "vllm:prefix_cache_hits"
SGLANG_RATE = "sglang:cache_hit_rate"
SGLANG_PROMPT = "sglang:prompt_tokens"


def parse(text: str) -> dict[str, float]:
    """Sample name -> value summed over its label sets (engines, models)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    url = url.rstrip("/")
    if not url.endswith("/metrics"):
        url += "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except OSError as exc:
        raise BenchError(f"--engine-metrics: cannot read {url}: {exc}") from None
    try:
        return parse(text)
    except ValueError as exc:
        raise BenchError(f"--engine-metrics: {url} is not Prometheus text: {exc}") from None


def _total(m: dict[str, float], name: str) -> float | None:
    # prometheus_client names counter samples with _total; accept both
    for key in (name + "_total", name):
        if key in m:
            return m[key]
    return None


def hit_rate(before: list[dict], after: list[dict]) -> dict:
    """The run's prefix-cache hit rate from per-engine scrapes taken before
    and after it: {"hit_rate": float | None, "queried_tokens", "hit_tokens",
    "engines": n}."""
    queried = hits = 0.0
    for b, a in zip(before, after):
        q0, q1 = _total(b, VLLM_QUERIES), _total(a, VLLM_QUERIES)
        h0, h1 = _total(b, VLLM_HITS), _total(a, VLLM_HITS)
        if None not in (q0, q1, h0, h1):
            queried += max(0.0, q1 - q0)
            hits += max(0.0, h1 - h0)
            continue
        p0, p1 = _total(b, SGLANG_PROMPT), _total(a, SGLANG_PROMPT)
        rate = a.get(SGLANG_RATE)
        if None not in (p0, p1, rate):
            grown = max(0.0, p1 - p0)
            queried += grown
            hits += grown * rate
    return {"hit_rate": hits / queried if queried > 0 else None,
            "queried_tokens": queried, "hit_tokens": hits, "engines": len(after)}
