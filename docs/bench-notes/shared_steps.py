"""Consecutive prefills on one instance that shared an engine step (stop 38):
from the simulator's records of a compare run (each prefill's engine
arrival, queue and first token), the pairs where the second started before
the first had ended; how long before that end the second reached the
engine; the first's last chunk (its uncached tokens modulo the preset's step budget);
and the second's service beyond its prefill alone (the preset's model).
An analysis aid, not a test.

    .venv/bin/python docs/bench-notes/shared_steps.py RUN_DIR/omni [...]"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from omni_ctl.bench import bound                    # noqa: E402


def pct(xs, f):
    return sorted(xs)[int(f * (len(xs) - 1))]


def main():
    for d in sys.argv[1:]:
        with open(os.path.join(d, "sim_requests.json")) as f:
            sim = json.load(f)
        cluster = bound.cluster_for(sim)
        by = {}
        for rid, r in bound.prefill_records(sim).items():
            a = r["arrival_unix"]
            by.setdefault(r["instance"], []).append(
                (a + r["queue_s"], a + r["ttft_s"], a,
                 r["prompt_tokens"] - r["cached_tokens"], r["cached_tokens"]))
        pairs, extra, early, rest = 0, [], [], []
        for ivs in by.values():
            ivs.sort()
            for (_, end0, _, new0, _), (start1, end1, arr1, new1, hit1) in zip(ivs, ivs[1:]):
                pairs += 1
                if start1 < end0 - 1e-4:
                    alone = bound.prefill_alone(cluster, new1, hit1)
                    extra.append(((end1 - start1) - alone) * 1000)
                    early.append((end0 - arr1) * 1000)
                    step = cluster.preset.max_num_batched_tokens
                    rest.append(new0 % step or step)
        print(f"{d}: {pairs} pairs, {len(extra)} started before the one before ended")
        if extra:
            print("  reached the engine before that end, ms p10/p50/p90: "
                  f"{pct(early, .1):.0f} / {pct(early, .5):.0f} / {pct(early, .9):.0f}")
            print("  the one before's last chunk, tokens p10/p50/p90: "
                  f"{pct(rest, .1)} / {pct(rest, .5)} / {pct(rest, .9)}")
            print(f"  own service beyond its prefill alone, ms p50/p90: "
                  f"{pct(extra, .5):.0f} / {pct(extra, .9):.0f}")


if __name__ == "__main__":
    main()
