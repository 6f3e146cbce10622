"""What-if for issue 24: the prefill queue's order past the starvation
timeout, on the clairvoyant model of omni_ctl/bench/bound.py (exact work,
no holding, no misprediction, no cache hits), over slices of the shipped
Mooncake trace.  An analysis aid, not a test: the rules below are written
out in Python for the model; the proxy runs the scoring library's.

    .venv/bin/python docs/bench-notes/issue24_whatif.py

Rules: "late" (before issue 24): among the requests past the timeout, the
one whose TTFT will be the largest (waited + work) first; "oldest": the
oldest first.  Otherwise both release the least key, work + aging * arrival
(aging 1, as the module)."""

import json
import os

from omni_ctl.bench import bound
from omni_ctl.bench.metrics import stats
from omni_ctl.sim.presets import get_preset

TRACE = os.path.join(os.path.dirname(bound.__file__), "traces",
                     "mooncake_synthetic_trace.jsonl")


class _Rule(bound._Model):
    """The bound's SJF model with the central queue's pick replaced by
    rule(now, items, work)."""

    def __init__(self, jobs, cluster, rule):
        super().__init__(jobs, cluster, "sjf")
        self.rule, self.work, self.items = rule, {}, []

    def _enqueue(self, s):
        self.work[s.i] = self.alone(s.job.prompt - s.computed, s.computed)
        self.items.append(s)
        self.queue = self.items

    def _next_central(self, t):
        return self.rule(t, self.items, self.work)

    def _take_central(self, s):
        self.items.remove(s)


def rule(starved_order, starvation_s=2.0, aging=1.0):
    def pick(t, q, work):
        late = [s for s in q if t - s.job.arrival >= starvation_s]
        if late and starved_order == "late":
            return max(late, key=lambda s: (t - s.job.arrival + work[s.i], -s.job.arrival))
        if late:
            return min(late, key=lambda s: s.job.arrival)
        return min(q, key=lambda s: (work[s.i] + aging * s.job.arrival, s.job.arrival))
    return pick


def trace(start, n, speedup):
    with open(TRACE) as f:
        rows = [json.loads(line) for line in f][start:start + n]
    t0 = rows[0]["timestamp"]
    return [bound.Job((r["timestamp"] - t0) / 1000.0 / speedup, r["input_length"], 0,
                      max(1, r["output_length"]))
            for r in rows if r["input_length"] <= 131072]


def main():
    cluster = bound.Cluster(get_preset("llama3-8b-h100"), 4, 4, "sequential", 1.0)
    print("| slice | speedup | SJF bound mean / p99 | FCFS bound mean / p99 "
          "| late: mean / p99 | oldest: mean / p99 |")
    print("|---|---|---|---|---|---|")
    for start, n, sp in ((0, 400, 2), (0, 400, 1.5), (400, 400, 2), (800, 400, 2),
                         (1200, 400, 2)):
        jobs = trace(start, n, sp)
        row = [f"{start}-{start + n - 1}", f"{sp:g}"]
        for pol in ("sjf", "fcfs"):
            st = stats(x * 1000 for x in bound.simulate(jobs, cluster, pol))
            row.append(f"{st['mean']:.0f} / {st['p99']:.0f}")
        for order in ("late", "oldest"):
            st = stats(x * 1000 for x in _Rule(jobs, cluster, rule(order)).run())
            row.append(f"{st['mean']:.0f} / {st['p99']:.0f}")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
