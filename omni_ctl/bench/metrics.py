"""Request-level numbers and their summary (definitions: PROTOCOLS.md section 6).

TTFT  client send -> first byte of the first chunk that carries generated text.
TPOT  (E2E - TTFT) / (output tokens - 1), for requests with >= 2 output tokens.
ITL   gaps between consecutive chunks that carry generated text.
E2E   client send -> end of the response.
Goodput: completed requests per second that met every SLO given.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import BenchError

SLO_METRICS = ("ttft", "tpot", "e2e")
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_SLO_ITEM = re.compile(r"^\s*([a-z0-9_]+)\s*=\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)?\s*$")


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=2s,tpot=50ms' -> {'ttft': 2000.0, 'tpot': 50.0} (milliseconds).
    A bare number is milliseconds."""
    if text is None or not text.strip():
        return {}
    out: dict[str, float] = {}
    for item in text.split(","):
        m = _SLO_ITEM.match(item.lower())
        if not m:
            raise BenchError(
                f"--slo: cannot read '{item.strip()}' in '{text}'; write "
                f"METRIC=VALUE[us|ms|s], e.g. ttft=2s,tpot=50ms")
        name, value, unit = m.group(1), float(m.group(2)), m.group(3) or "ms"
        if name not in SLO_METRICS:
            raise BenchError(
                f"--slo: unknown metric '{name}' in '{text}' "
                f"(known: {', '.join(SLO_METRICS)})")
        if name in out:
            raise BenchError(f"--slo: '{name}' is given twice in '{text}'")
        if value <= 0:
            raise BenchError(f"--slo: '{item.strip()}' must be above zero")
        out[name] = value * _UNITS_MS[unit]
    return out


@dataclass
class RequestRecord:
    """What one request did. Times are seconds on the benchmark's clock
    (perf_counter minus the start of the run) and milliseconds for spans."""
    index: int
    session: int
    turn: int
    scheduled_s: float | None = None   # open loop: when it was due
    start_s: float | None = None       # when it was sent
    end_s: float | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list = field(default_factory=list)
    prompt_len: int = 0                # intended prompt tokens
    prompt_tokens: int | None = None   # from the server's usage, when given
    output_tokens: int = 0
    output_tokens_from: str = ""       # "usage" or "chunks"
    http_status: int | None = None
    ok: bool = False
    error_kind: str | None = None
    error: str | None = None
    error_json: bool | None = None     # an HTTP error's body was a JSON error
    engine_request_id: str | None = None  # X-Omni-Request-Id: the id the engines saw
    text: str = ""                     # generated text (kept for multiturn)

    @property
    def tpot_ms(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft_ms is None:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    def meets(self, slo: dict[str, float]) -> bool:
        if not self.ok:
            return False
        values = {"ttft": self.ttft_ms, "tpot": self.tpot_ms, "e2e": self.e2e_ms}
        for name, limit in slo.items():
            v = values[name]
            # TPOT is undefined for one-token answers; nothing to violate.
            if v is not None and v > limit:
                return False
        return True

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("text")
        d["tpot_ms"] = self.tpot_ms
        return d


def stats(values) -> dict:
    """mean/p50/p90/p99/max of a list of numbers (None when empty).
    Percentiles interpolate linearly between order statistics."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None,
                "max": None, "count": 0}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"mean": float(arr.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(arr.max()), "count": int(arr.size)}


def summarize(records: list[RequestRecord], duration_s: float,
              slo: dict[str, float], not_sent: int = 0) -> dict:
    """The summary.json core: counts, throughput, latency stats, goodput.
    `requests` counts every request sent; each one is either completed or an
    error (with its kind); `not_sent` counts planned requests never sent."""
    done = [r for r in records if r.ok]
    kinds = Counter(r.error_kind for r in records if not r.ok)
    out_tokens = sum(r.output_tokens for r in done)
    good = sum(1 for r in done if r.meets(slo))
    dur = max(duration_s, 1e-9)
    prompt_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None
                        else r.prompt_len for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "errors": len(records) - len(done),
        "error_kinds": dict(sorted(kinds.items())),
        "not_sent": not_sent,
        "duration_s": duration_s,
        "request_throughput": len(done) / dur,
        "output_token_throughput": out_tokens / dur,
        "input_token_throughput": prompt_tokens / dur,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": prompt_tokens,
        "ttft_ms": stats(r.ttft_ms for r in done),
        "tpot_ms": stats(r.tpot_ms for r in done),
        "itl_ms": stats(x for r in done for x in r.itl_ms),
        "e2e_ms": stats(r.e2e_ms for r in done),
        "slo": {f"{k}_ms": v for k, v in slo.items()},
        "goodput": good / dur,
        "good_requests": good,
        "slo_attainment": good / len(records) if records else None,
        "send_lag_ms": stats(
            (r.start_s - r.scheduled_s) * 1000.0 for r in records
            if r.scheduled_s is not None and r.start_s is not None),
    }
