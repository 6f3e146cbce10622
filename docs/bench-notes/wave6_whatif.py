"""What-if search (wave 6) for a prefill release order with the mean near
the SJF bound and the p99 at or under the FCFS bound's, on the clairvoyant
model of omni_ctl/bench/bound.py (exact work, no holding, no misprediction).
An analysis aid, not a test.

    .venv/bin/python docs/bench-notes/wave6_whatif.py RULE[,RULE...] [RUN_DIR ...]

RULEs: share (wave 4's starved share), lsold:5@0.25 (waves 6-9: latest
start 5 s, aging 0.25), lsback:5/1.25@0.25 (wave 10: the bound follows the
backlog), lsbacka:5/1.25@0.25 (wave 11, the module's rule: the aging scaled by
timeout / bound as well; lsbacka:5/1.25/E@0.25 scales by its power E),
lsbackt:5/1.25/0.2/0.2t@0.25 (stop 46, the module's rule: lsbacka, and a
request of at most 0.2 s of work goes before the starved while the oldest
starved one is less than 0.2 x the timeout past the bound), lsbackc (stop
46, not made: at most all but C instances run starved work), and the
others below; without RUN_DIRs, the trace slices of starved_share_whatif.py.

A RULE ending in ~G (e.g. lsbacka:5/1.25@0.25~10) also idles a prefill
instance G ms before each step that starts a new request's prefill: the
handover a live proxy has and the model does not (the prefill's answer to
the proxy, the release, the body to the engine, its parsing and hashing;
docs/scheduler.md, "What a handover costs")."""

import collections
import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import issue24_whatif as w                      # noqa: E402
from starved_share_whatif import load           # noqa: E402
from omni_ctl.bench import bound                # noqa: E402
from omni_ctl.bench.metrics import stats        # noqa: E402
from omni_ctl.sim.presets import get_preset     # noqa: E402

T = 2.0     # starvation timeout


class Model(w._Rule):
    def __init__(self, jobs, cluster, name):
        super().__init__(jobs, cluster, None)
        name, _, gap = name.partition("~")
        name, _, aging = name.partition("@")
        self.aging = float(aging) if aging else 1.0
        self.gap = float(gap) / 1000.0 if gap else 0.0
        self.name, self.starved = name, set()
        self.recent = []        # recent TTFT estimates (start wait + work)
        self.works = collections.deque()    # the work of recent arrivals (lsq)

    def _enqueue(self, s):
        super()._enqueue(s)
        self.works.append(self.work[s.i])

    def _at(self, t, kind, inst=None, seq=None):
        # a step that starts a new request's prefill on a prefill
        # instance ends `gap` later (the instance idled before it)
        if kind == "step" and self.gap and inst in self.pre and any(
                s.computed == 0 and s.job.prompt > 0 for s, _ in inst.batch):
            t += self.gap
        super()._at(t, kind, inst, seq)

    def _next_central(self, t):
        s, starved = self._pick(t, self.items)
        self._starved_pick = starved
        return s

    def _take_central(self, s):
        super()._take_central(s)
        if self._starved_pick:
            self.starved.add(s.i)

    def _pull_central(self, inst, t, batch, budget):
        self._inst = inst
        return super()._pull_central(inst, t, batch, budget)

    def horizon(self):
        """Until another instance than the one being filled ends its
        prefills (0 when one is idle): when this pick is passed over, the
        next chance to start."""
        rest = []
        for x in self.pre:
            if x is getattr(self, "_inst", None):
                continue
            rest.append(sum(self.alone(s.job.prompt - s.computed, s.computed)
                            for s in x.running if s.computed < s.job.prompt))
        return min(rest) if rest else 0.0

    def busy_starved(self):
        return sum(1 for x in self.pre
                   if any(s.i in self.starved and s.computed < s.job.prompt
                          for s in x.running))

    def sjf(self, q, scale=1.0):
        a = self.aging * scale
        return min(q, key=lambda s: (self.work[s.i] + a * s.job.arrival, s.job.arrival))

    def _pick(self, t, q):
        name = self.name
        work = self.work
        if name in ("share", "oldest"):
            late = [s for s in q if t - s.job.arrival >= T]
            if late:
                oldest = min(late, key=lambda s: s.job.arrival)
                if name == "oldest":
                    return oldest, True
                seats = min(len(self.pre), max(1, math.ceil(sum(work[s.i] for s in late) / T)))
                if self.busy_starved() < seats or t - oldest.job.arrival >= 2 * T:
                    return oldest, True
            return self.sjf(q), False
        kind, _, arg = name.partition(":")
        if kind == "lshor":
            # latest start with a look ahead: urgent when waited + the wait
            # for the next other instance + own work reaches B
            B = float(arg)
            h = self.horizon()
            urgent = [s for s in q if t - s.job.arrival + h + work[s.i] >= B]
            if urgent:
                return min(urgent, key=lambda s: s.job.arrival), True
            return self.sjf(q), False
        if kind in ("ls", "lsshare", "lsold", "lsoldshare", "lslong", "lslongshare"):
            # latest start: urgent when waited + own work reaches B
            B, _, scan = arg.partition("/")
            B = float(B)
            self.maxq = max(getattr(self, "maxq", 0), len(q))
            # the module scans the oldest `scan` entries only
            look = sorted(q, key=lambda s: s.job.arrival)[:int(scan)] if scan else q
            urgent = [s for s in look if t - s.job.arrival + work[s.i] >= B]
            if urgent:
                if kind.startswith("lsold"):
                    pick = min(urgent, key=lambda s: s.job.arrival)
                elif kind.startswith("lslong"):
                    pick = max(urgent, key=lambda s: (work[s.i], -s.job.arrival))
                else:
                    pick = max(urgent, key=lambda s: (t - s.job.arrival + work[s.i], -s.job.arrival))
                if not kind.endswith("share"):
                    return pick, True
                seats = min(len(self.pre), max(1, math.ceil(sum(work[s.i] for s in urgent) / T)))
                if self.busy_starved() < seats or t - pick.job.arrival + work[pick.i] >= 2 * B:
                    return pick, True
            return self.sjf(q), False
        if kind == "lsback":
            # wave 10 (the module's rule): latest start, the bound
            # max(B, k x the backlog), the backlog being the queue's work per
            # instance; oldest urgent first
            B, _, k = arg.partition("/")
            B, k = float(B), float(k or 1.25)
            backlog = sum(work[s.i] for s in q) / max(1, len(self.pre))
            bound = max(B, k * backlog)
            urgent = [s for s in q if t - s.job.arrival + work[s.i] >= bound]
            if urgent:
                return min(urgent, key=lambda s: s.job.arrival), True
            return self.sjf(q), False
        if kind == "lsbacka":
            # wave 11: lsback, and the aging scaled by B / bound (under a
            # backlog the aging does not turn the order back to FCFS)
            B, _, k = arg.partition("/")
            k, _, e = k.partition("/")
            B, k, e = float(B), float(k or 1.25), float(e or 1)
            backlog = sum(work[s.i] for s in q) / max(1, len(self.pre))
            bound = max(B, k * backlog)
            urgent = [s for s in q if t - s.job.arrival + work[s.i] >= bound]
            if urgent:
                return min(urgent, key=lambda s: s.job.arrival), True
            return self.sjf(q, (B / bound) ** e), False
        if kind == "lsbackc":
            # stop 46: lsbacka, but a starved request goes only while fewer
            # than (instances - C) prefill instances run starved work, so C
            # instances keep serving the order (lsbackc:B/k/C)
            B, k, c = (arg.split("/") + ["1.25", "1"])[:3]
            B, k, c = float(B), float(k), int(c)
            backlog = sum(work[s.i] for s in q) / max(1, len(self.pre))
            bound = max(B, k * backlog)
            urgent = [s for s in q if t - s.job.arrival + work[s.i] >= bound]
            if urgent and self.busy_starved() < max(1, len(self.pre) - c):
                return min(urgent, key=lambda s: s.job.arrival), True
            return self.sjf(q, B / bound), False
        if kind == "lsbackt":
            # stop 46: lsbacka, but a request whose work is at most F
            # seconds goes before the starved (lsbackt:B/k/F)
            # (F ending in r: that fraction of the starvation bound)
            B, k, F, W = (arg.split("/") + ["1.25", "0.1", "1e9"])[:4]
            # (W ending in t: that fraction of the timeout B, not the bound)
            wt = W.endswith("t")
            W = float(W.rstrip("t"))
            rel = F.endswith("r")
            B, k, F = float(B), float(k), float(F.rstrip("r"))
            backlog = sum(work[s.i] for s in q) / max(1, len(self.pre))
            bound = max(B, k * backlog)
            if rel:
                F *= bound
            urgent = [s for s in q if t - s.job.arrival + work[s.i] >= bound]
            best = self.sjf(q, B / bound)
            if urgent:
                old = min(urgent, key=lambda s: s.job.arrival)
                # lsbackt:B/k/F/W: the short go first only while the oldest
                # starved is less than W (a fraction of the bound) past it
                late = t - old.job.arrival + work[old.i] - bound
                if work[best.i] > F or late >= W * (B if wt else bound):
                    return old, True
            return best, False
        if kind == "lsbacks":
            # lsbacka with a backlog that rises slowly: the least of the
            # backlog of now and its average over TAU seconds (a burst
            # does not lift the bound at once; a sustained backlog does)
            B, k, tau = (arg.split("/") + ["1.25", "5"])[:3]
            B, k, tau = float(B), float(k), float(tau)
            now_b = sum(work[s.i] for s in q) / max(1, len(self.pre))
            last_t, avg = getattr(self, "_ewma", (t, 0.0))
            avg += (now_b - avg) * (1 - math.exp(-(t - last_t) / tau)) if tau > 0 else now_b - avg
            self._ewma = (t, avg)
            bound = max(B, k * min(now_b, avg))
            urgent = [s for s in q if t - s.job.arrival + work[s.i] >= bound]
            if urgent:
                return min(urgent, key=lambda s: s.job.arrival), True
            return self.sjf(q, B / bound), False
        if kind == "lsq":
            # lsbacka with the timeout the least of B and k x the q-quantile
            # of the work of the last N arrivals (at least FLOOR): a timeout
            # that follows the workload's own scale
            floor, B, k, qq, n = (float(x) for x in arg.split("/"))
            while len(self.works) > n:
                self.works.popleft()
            ws = sorted(self.works)
            top = ws[min(len(ws) - 1, int(qq * len(ws)))] if ws else B
            B = min(B, max(floor, k * top))
            backlog = sum(work[s.i] for s in q) / max(1, len(self.pre))
            bound = max(B, 1.25 * backlog)
            urgent = [s for s in q if t - s.job.arrival + work[s.i] >= bound]
            if urgent:
                return min(urgent, key=lambda s: s.job.arrival), True
            return self.sjf(q, B / bound), False
        if kind == "hrr":
            # stop 41: the starvation bound of lsback, and below it the
            # highest response ratio (wait + c) / work first instead of the
            # aged key (c seconds: 0 is pure HRRN; larger leans to SJF)
            # (hrr:B/k/c/e: the waits weigh (B / bound)^e, weaker under a
            # backlog, as lsbacka's aging)
            B, k, c, e = (arg.split("/") + ["1.25", "0", "0"])[:4]
            B, k, c, e = float(B), float(k), float(c), float(e)
            backlog = sum(work[s.i] for s in q) / max(1, len(self.pre))
            bound = max(B, k * backlog)
            urgent = [s for s in q if t - s.job.arrival + work[s.i] >= bound]
            if urgent:
                return min(urgent, key=lambda s: s.job.arrival), True
            f = (B / bound) ** e
            return max(q, key=lambda s: ((f * (t - s.job.arrival) + c)
                                         / max(work[s.i], 1e-6), -s.job.arrival)), False
        if kind == "slow":
            # wave 7: latest start B, or a slowdown cap: urgent when waited
            # >= k x own work (and at least m seconds); oldest urgent first
            k, _, rest = arg.partition("/")
            m, _, B = rest.partition("/")
            k, m, B = float(k), float(m or 0), float(B or 5)
            urgent = [s for s in q if t - s.job.arrival + work[s.i] >= B
                      or t - s.job.arrival >= max(m, k * work[s.i])]
            if urgent:
                return min(urgent, key=lambda s: s.job.arrival), True
            return self.sjf(q), False
        if kind == "adapt":
            # B follows the backlog: the FCFS drain time of what waits now
            k = float(arg or 1)
            drain = sum(work[s.i] for s in q) / max(1, len(self.pre))
            B = max(T, k * drain)
            urgent = [s for s in q if t - s.job.arrival + work[s.i] >= B]
            if urgent:
                return max(urgent, key=lambda s: (t - s.job.arrival + work[s.i], -s.job.arrival)), True
            return self.sjf(q), False
        if kind == "share_ls":
            # today's share, but a request is starved when waited + work >= B
            B = float(arg)
            late = [s for s in q if t - s.job.arrival >= T or t - s.job.arrival + work[s.i] >= B]
            if late:
                oldest = min(late, key=lambda s: s.job.arrival)
                seats = min(len(self.pre), max(1, math.ceil(sum(work[s.i] for s in late) / T)))
                if self.busy_starved() < seats or t - oldest.job.arrival >= 2 * T:
                    return oldest, True
            return self.sjf(q), False
        raise SystemExit(f"unknown rule {name}")


def main():
    rules = sys.argv[1].split(",")
    if sys.argv[2:]:
        cases = [(os.path.basename(os.path.dirname(d.rstrip("/"))) or d, *load(d))
                 for d in sys.argv[2:]]
    else:
        cluster = bound.Cluster(get_preset("llama3-8b-h100"), 4, 4, "sequential", 1.0)
        cases = [(f"{a}-{a + n - 1}@{sp:g}", w.trace(a, n, sp), cluster)
                 for a, n, sp in ((0, 400, 2), (0, 400, 1.5), (400, 400, 2), (800, 400, 2),
                                  (1200, 400, 2), (1600, 400, 2), (2000, 400, 2))]
    print("case | SJF m/p99 | FCFS m/p99 | " + " | ".join(rules))
    for label, jobs, cluster in cases:
        sj = stats(x * 1000 for x in bound.simulate(jobs, cluster, "sjf"))
        fc = stats(x * 1000 for x in bound.simulate(jobs, cluster, "fcfs"))
        row = [label, f"{sj['mean']:.0f}/{sj['p99']:.0f}", f"{fc['mean']:.0f}/{fc['p99']:.0f}"]
        for r in rules:
            st = stats(x * 1000 for x in Model(jobs, cluster, r).run())
            row.append(f"{st['mean'] / sj['mean']:.2f}/{st['p99'] / fc['p99']:.2f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
