"""What-if for the starved share (wave 4): on the clairvoyant model of
omni_ctl/bench/bound.py (exact work, no holding, no misprediction, no cache
hits), over slices of the shipped Mooncake trace, the prefill queue's rule
past the starvation timeout: every free instance takes the oldest starved
request ("oldest", issue 24), or only as many instances as do the starved
work within one timeout ("share", omni_policy_starved_seats()), the others
taking the least key, unless the oldest waited two timeouts (then it goes
on any instance).  An analysis aid, not a test: the rules are written
out in Python for the model; the proxy runs the scoring library's.

    .venv/bin/python docs/bench-notes/starved_share_whatif.py [RUN_DIR ...]

With RUN_DIRs (the omni directory of `compare` runs), the same on each
run's own requests: its arrival times and the cache hits the simulator
reported (the bounds' inputs, omni_ctl.bench.bound.jobs_for()).

An instance counts as running a starved release until that prefill is
done (the module: until its predicted completion)."""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import issue24_whatif as w                      # noqa: E402
from omni_ctl.bench import bound                # noqa: E402
from omni_ctl.bench.metrics import stats        # noqa: E402
from omni_ctl.sim.presets import get_preset     # noqa: E402

STARVATION_S = 2.0


class _Share(w._Rule):
    """The what-if's model with the instance that pulls and the set of
    starved releases given to the rule."""

    def __init__(self, jobs, cluster, share):
        super().__init__(jobs, cluster, None)
        self.share, self.starved = share, set()

    def _next_central(self, t):
        s, self._starved_pick = self._pick(t, self.items)
        return s

    def _take_central(self, s):
        super()._take_central(s)
        if self._starved_pick:
            self.starved.add(s.i)

    def _pick(self, t, q):
        late = [s for s in q if t - s.job.arrival >= STARVATION_S]
        if late:
            if not self.share:
                return min(late, key=lambda s: s.job.arrival), True
            work = sum(self.work[s.i] for s in late)
            seats = min(len(self.pre), max(1, math.ceil(work / STARVATION_S)))
            busy = sum(1 for x in self.pre
                       if any(s.i in self.starved and s.computed < s.job.prompt
                              for s in x.running))
            oldest = min(late, key=lambda s: s.job.arrival)
            if busy < seats or t - oldest.job.arrival >= 2 * STARVATION_S:
                return oldest, True
        return min(q, key=lambda s: (self.work[s.i] + s.job.arrival, s.job.arrival)), False


def _row(label, jobs, cluster):
    row = list(label)
    for pol in ("sjf", "fcfs"):
        st = stats(x * 1000 for x in bound.simulate(jobs, cluster, pol))
        row.append(f"{st['mean']:.0f} / {st['p99']:.0f}")
    got = []
    for share in (False, True):
        st = stats(x * 1000 for x in _Share(jobs, cluster, share).run())
        got.append(st)
        row.append(f"{st['mean']:.0f} / {st['p99']:.0f}")
    row.append(f"{got[1]['mean'] / got[0]['mean'] - 1:+.1%}, "
               f"{got[1]['p99'] / got[0]['p99'] - 1:+.1%}")
    print("| " + " | ".join(row) + " |", flush=True)


def runs(dirs):
    print("| run | requests | SJF bound | FCFS bound | oldest (issue 24) "
          "| starved share | mean, p99 change |")
    print("|---|---|---|---|---|---|---|")
    for d in dirs:
        jobs, cluster = load(d)
        _row((d, str(len(jobs))), jobs, cluster)


def load(d):
    """The bounds' inputs for one omni directory of a compare run: its
    requests (arrival times, cache hits) and the simulated cluster."""
    with open(os.path.join(d, "requests.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(d, "sim_requests.json")) as f:
        sim = json.load(f)
    cluster = bound.cluster_for(sim)
    jobs, _, _ = bound.jobs_for(records, sim, "compare-omni")
    return jobs, cluster


def main():
    if sys.argv[1:]:
        return runs(sys.argv[1:])
    cluster = bound.Cluster(get_preset("llama3-8b-h100"), 4, 4, "sequential", 1.0)
    print("| trace requests | speedup | SJF bound | FCFS bound | oldest (issue 24) "
          "| starved share | mean, p99 change |")
    print("|---|---|---|---|---|---|---|")
    for start, n, sp in ((0, 400, 2), (0, 400, 1.5), (400, 400, 2), (800, 400, 2),
                         (1200, 400, 2), (1600, 400, 2), (2000, 400, 2), (0, 400, 2.5)):
        _row((f"{start}-{start + n - 1}", f"{sp:g}"), w.trace(start, n, sp), cluster)


if __name__ == "__main__":
    main()
