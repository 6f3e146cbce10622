"""How far the prefill legs of requests sent to a busy instance ran past
their prediction, by the size of the prefill running there when they reached
the engine (docs/benchmarks.md section 1, stop 39).

    python docs/bench-notes/early_bound.py RUN_DIR/omni [...]

A request counts as sent to a busy instance when the proxy predicted a wait
for it (`prefill_pred_wait_ms` > 0 in the access log); its error is the
measured prefill leg less the predicted leg and wait.  The running prefill
is, from the simulator's records, the one on that instance that had arrived
before it and ended last after its arrival."""

import json
import sys
from pathlib import Path


def fields(line):
    return dict(p.split("=", 1) for p in line.split() if "=" in p)


def running_before(sim):
    """engine request id (the proxy's) -> uncached tokens of the prefill
    running on its instance when it arrived (None: idle)."""
    out = {}
    for inst in sim["instances"]:
        if inst["role"] != "prefill":
            continue
        reqs = [r for r in inst["requests"] if r["ttft_s"] is not None]
        for r in reqs:
            t = r["arrival_unix"]
            busy = [q for q in reqs if q["arrival_unix"] < t < q["arrival_unix"] + q["ttft_s"]]
            last = max(busy, key=lambda q: q["arrival_unix"] + q["ttft_s"], default=None)
            out[r["x_request_id"]] = (None if last is None
                                      else last["prompt_tokens"] - last["cached_tokens"])
    return out


def main(dirs):
    edges = (0, 8000, 20000, 40000, None)
    for d in map(Path, dirs):
        running = running_before(json.loads((d / "sim_requests.json").read_text()))
        rows = []
        for line in (d / "run" / "access.log").read_text().splitlines():
            f = fields(line)
            if f.get("mode") in (None, "-") or f.get("prefill_pred_wait_ms", "-") in ("-", "0"):
                continue
            err = (int(f["prefill_ms"]) - int(f["prefill_pred_ms"])
                   - int(f["prefill_pred_wait_ms"]))
            rows.append((running.get(f["id"]), err))
        print(f"{d}: {len(rows)} requests sent to a busy instance")
        for lo, hi in zip(edges, edges[1:]):
            e = sorted(err for tok, err in rows
                       if tok is not None and tok >= lo and (hi is None or tok < hi))
            if e:
                n = len(e)
                print(f"  running {lo}-{hi or 'more'} tokens: n={n}, leg past its prediction, "
                      f"ms p10/p50/p90: {e[n // 10]} / {e[n // 2]} / {e[9 * n // 10]}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
