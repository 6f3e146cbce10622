"""`omni-ctl explain RUN_DIR`: where the time between a request's arrival and
its first token went, request by request, for an Omni Proxy run of `bench`
or `compare` (a directory with requests.jsonl and run/access.log).

Each request's TTFT (the client's) is cut into causes that add up to it:

  no instance free   held in the proxy while every prefill instance had a leg
                     in flight, plus the wait in the engine's queue up to the
                     hold slack (the proxy sends a request that long before it
                     predicts the instance free)
  idle instance      held while some prefill instance had no leg in flight:
                     a decision that was not work-conserving
  starvation release held while an instance ran a request with more work,
                     released past the starvation timeout after this one
                     arrived
  misprediction      the wait in the engine's queue beyond the hold slack (the
                     work ahead took longer than predicted), and the prefill
                     of tokens the proxy's index counted as cached on the
                     chosen instance that the engine did not hold
  shared step        the engine's prefill time beyond the prompt's prefill
                     alone (other prompts' chunks and decodes in its steps)
  prefill            the prefill of its uncached tokens alone (the preset's
                     cost model), less what counts as misprediction
  decode + KV        the decode leg: KV transfer and the first decode step
                     (the decode engine's time to the first token; parallel
                     P/D, where both legs leave together: from the prefill
                     engine's end of the prompt to the first token)
  overhead           the rest: HTTP hops client-proxy-engines, the proxy's
                     own time between the legs, and the engine's front end
                     before its queue (a text prompt's tokenization)

Sources: the proxy's access log (arrival, hold, leg, per-request predicted
prefill and index hit, `t=$msec`), the simulator's per-request records
(sim_requests.json: engine-side queue and prefill times, true cache hits),
the run's nginx.conf (hold slack, starvation timeout) and /omni/status
(omni_status.json). What they do not record is said in the output.
"""

from __future__ import annotations

import json
import os
import re
import shlex

from . import bound
from .errors import BenchError

CAUSES = (("wait", "no instance free"), ("idle", "idle instance"),
          ("starved", "starvation release"), ("mispredict", "misprediction"),
          ("shared", "shared step"), ("prefill", "prefill (own work)"),
          ("decode", "decode + KV transfer"), ("tokenize", "engines' tokenizing"),
          ("overhead", "overhead (HTTP, proxy)"))

_FIELD = re.compile(r"(\w+)=(\S+)")
_NUMERIC = ("prompt_tokens", "cached_tokens", "queue_ms", "prefill_ms",
            "prefill_pred_ms", "ttft_ms", "total_ms", "prefill_pred_wait_ms",
            "start_us")

# what no source records, said with every explanation; a proxy that logs
# release=, prefill_pred_wait_ms= and start_us= (its log_format since the
# SLO release) records the first three, which are then left out
MISSING_BY_FIELD = ("release", "prefill_pred_wait_ms", "start_us")
MISSING = (
    "Why a request was released: the access log has no release reason, so a request "
    "counts as released by the starvation timeout when its queue_ms reached "
    "omni_prefill_starvation_timeout (the proxy would need to log e.g. "
    "$omni_release_reason = now|order|starved|free-instance).",
    "The predicted start: the access log has the predicted completion "
    "($omni_prefill_pred_ms) but not the predicted wait at release, so all engine "
    "queueing beyond omni_hold_slack counts as a start misprediction (the proxy "
    "would need $omni_prefill_pred_wait_ms).",
    "Stage instants are rebuilt from t=$msec minus total_ms, queue_ms and prefill_ms, "
    "all whole milliseconds: each boundary is uncertain by 1-2 ms (the proxy would "
    "need its arrival as Unix microseconds, e.g. $omni_start_us).",
    "Which instances could have started a request: an instance counts as idle when "
    "the proxy had no prefill leg in flight there; the proxy's reasons to skip it "
    "(its request limit, a shorter request waiting for its step, most of the prompt "
    "cached on a busy one) are not logged.",
)


def parse_access_log(path: str) -> list[dict]:
    """The omni log_format lines of prefill/decode requests (those with an id)."""
    out = []
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise BenchError(f"cannot read the proxy's access log {path}: {exc}") from None
    with f:
        for line in f:
            fields = dict(_FIELD.findall(line))
            if fields.get("id", "-") == "-" or "t" not in fields:
                continue
            row = {"id": fields["id"], "prefill": fields.get("prefill", "-"),
                   "decode": fields.get("decode", "-"), "mode": fields.get("mode", "-"),
                   "error": fields.get("error", "-"), "t": float(fields["t"]),
                   "release": fields.get("release", "-")}
            for k in _NUMERIC:
                v = fields.get(k, "-")
                row[k] = int(v) if v.isdigit() else None
            out.append(row)
    return out


def _arrival(row) -> float:
    """A request's arrival, Unix seconds: $omni_start_us when logged, else
    rebuilt from t=$msec less total_ms (whole milliseconds)."""
    if row.get("start_us") is not None:
        return row["start_us"] / 1e6
    return row["t"] - row["total_ms"] / 1000.0


def _count(values) -> dict:
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _missing(log) -> list[str]:
    """MISSING less what every line of this log records."""
    out = []
    for i, text in enumerate(MISSING):
        if i < len(MISSING_BY_FIELD) and log and all(
                row.get(MISSING_BY_FIELD[i]) not in (None, "-") for row in log):
            continue
        out.append(text)
    return out


def conf_ms(path: str, directive: str) -> float | None:
    """A duration directive of the run's nginx.conf, in ms."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)?", conf_value(path, directive) or "")
    if not m:
        return None
    return float(m.group(1)) * (1000.0 if m.group(2) == "s" else 1.0)


def conf_value(path: str, directive: str) -> str | None:
    """A directive's value in the run's nginx.conf, None when absent."""
    try:
        text = open(path).read()
    except OSError:
        return None
    m = re.search(rf"^\s*{directive}\s+([^;]+);", text, re.M)
    return m.group(1).strip() if m else None


def _load_json(path, what, required=True):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        if required:
            raise BenchError(f"{what} not found: {path}") from None
        return None
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {what} {path}: {exc}") from None


def _records(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise BenchError(f"no requests.jsonl in the run directory ({path}): give the "
                         f"directory of one target's run (e.g. bench-out/compare/omni)") from None
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc}") from None


# --- interval arithmetic ----------------------------------------------------------

def merge(intervals, tolerance=0.0):
    """Sorted union of [a, b] intervals; gaps up to `tolerance` are closed."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1] + tolerance:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def complement(busy, lo, hi):
    """[lo, hi] minus the merged intervals `busy`."""
    out, cur = [], lo
    for a, b in busy:
        if b <= cur:
            continue
        if a > hi:
            break
        if a > cur:
            out.append([cur, min(a, hi)])
        cur = max(cur, b)
    if cur < hi:
        out.append([cur, hi])
    return out


def overlap(a, b, sets):
    """Length of [a, b] covered by the merged intervals `sets`."""
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in sets)


def minus(sets, other):
    """Merged intervals `sets` without the merged intervals `other`."""
    out = []
    for a, b in sets:
        out.extend(complement(other, a, b))
    return out


# --- the attribution -----------------------------------------------------------------

def explain(run_dir: str, worst: int = 10, idle_tolerance_ms: float = 3.0,
            access_log: str | None = None, nginx_conf: str | None = None) -> dict:
    """Attribute each completed request's TTFT to the causes above; return
    {"requests", "totals", "notes", "missing", "markdown", ...}. The proxy's
    access log and nginx.conf are RUN_DIR/run/ (where compare starts it)
    unless given."""
    if not os.path.isdir(run_dir):
        raise BenchError(f"not a directory: {run_dir}")
    summary = _load_json(os.path.join(run_dir, "summary.json"), "summary.json",
                         required=False) or {}
    records = _records(os.path.join(run_dir, "requests.jsonl"))
    run_id = (summary.get("config") or {}).get("run_id") \
        or f"compare-{os.path.basename(os.path.normpath(run_dir))}"
    log = parse_access_log(access_log or os.path.join(run_dir, "run", "access.log"))
    conf = nginx_conf or os.path.join(run_dir, "run", "nginx.conf")
    slack = conf_ms(conf, "omni_hold_slack")
    starve = conf_ms(conf, "omni_prefill_starvation_timeout")
    sim = _load_json(os.path.join(run_dir, "sim_requests.json"), "sim_requests.json",
                     required=False)
    status = _load_json(os.path.join(run_dir, "omni_status.json"), "omni_status.json",
                        required=False)
    parent = _load_json(os.path.join(os.path.dirname(os.path.normpath(run_dir)),
                                     "compare.json"), "compare.json", required=False)
    notes = []
    if slack is None:
        slack = 20.0
        notes.append("no omni_hold_slack in run/nginx.conf: taken as 20 ms (the default)")
    if starve is None:
        starve = 5000.0
        notes.append("no omni_prefill_starvation_timeout in run/nginx.conf: taken as "
                     "5000 ms (the default)")
    cluster = None
    if sim:
        sim_args = (parent or {}).get("sim_args") or ()
        if isinstance(sim_args, str):
            sim_args = shlex.split(sim_args)
        cluster = bound.cluster_for(sim, sim_args)
        pre_rec, dec_rec = bound.prefill_records(sim), bound.decode_records(sim)
    else:
        pre_rec, dec_rec = {}, {}
        notes.append("no sim_requests.json (the simulator's per-request records): the "
                     "prefill leg is not split into engine queue, shared steps and own "
                     "work, nor the decode leg from the overhead")

    for row in log:
        if row["mode"] == "aggregated":
            # one leg: to its first byte, on the (decode-tier) instance
            row["prefill"] = row["decode"]
            if row["ttft_ms"] is not None and row["queue_ms"] is not None:
                row["prefill_ms"] = row["ttft_ms"] - row["queue_ms"]
    if conf_value(conf, "omni_model_path"):
        notes.append("the proxy tokenized the prompts (omni_model_path): its queue_ms "
                     "includes the wait for the tokenizer service, counted here as held "
                     "(no instance free, or an idle instance)")
    modes = {row["mode"] for row in log if row["mode"] != "-"}
    if "parallel" in modes:
        notes.append("parallel P/D: the prefill leg answers after the KV transfer, which "
                     "the prefill engine overlaps with its next work, so a prefill "
                     "instance counts as busy until the engine's end of the prompt (the "
                     "simulator's record) and 'decode + KV transfer' is the time from "
                     "there to the first token")
    by_id = {row["id"]: row for row in log}
    legs = []            # every prefill leg in the log: (instance, send, back, id)
    for row in log:
        if row["prefill_ms"] is None or row["total_ms"] is None \
                or row["queue_ms"] is None or row["prefill"] == "-":
            continue
        arrive = _arrival(row)
        send = arrive + row["queue_ms"] / 1000.0
        back = send + row["prefill_ms"] / 1000.0
        pr = pre_rec.get(row["id"]) if row["mode"] == "parallel" else None
        if pr is not None:
            back = min(back, _engine_end(pr, send))
        legs.append((row["prefill"], send, back, row["id"]))
    instances = sorted({leg[0] for leg in legs})
    if sim:
        addr = [i["url"].split("//", 1)[-1] for i in sim.get("instances", [])
                if i.get("role") in ("prefill", "both") and i.get("url")]
        instances = sorted(set(instances) | set(addr))

    rows = []
    unmatched = 0
    for r in records:
        if not r.get("ok") or r.get("ttft_ms") is None:
            continue
        # the id the engines and the access log saw: the proxy's own when the
        # answer said it (X-Omni-Request-Id), else the client's RUN_ID-INDEX
        row = by_id.get(r.get("engine_request_id") or f"{run_id}-{r['index']}")
        if row is None or row["queue_ms"] is None or row["total_ms"] is None:
            unmatched += 1
            continue
        arrive = _arrival(row)
        rows.append({"index": r["index"], "id": row["id"], "ttft_ms": r["ttft_ms"],
                     "row": row, "arrive": arrive,
                     "send": arrive + row["queue_ms"] / 1000.0})
    if not rows:
        raise BenchError(f"no request of {run_dir} is in its access log under the ids "
                         f"{run_id}-N: not an Omni Proxy run of bench or compare?")
    if unmatched:
        notes.append(f"{unmatched} completed requests have no line in the access log "
                     f"(or no timings there): left out")

    lo = min(x["arrive"] for x in rows)
    hi = max([x["send"] for x in rows] + [leg[2] for leg in legs])
    tol = idle_tolerance_ms / 1000.0
    idle_any = merge([iv for inst in instances for iv in complement(
        merge([(a, b) for i, a, b, _ in legs if i == inst], tol), lo, hi)])
    work = {}
    for x in rows:
        row = x["row"]
        work[x["id"]] = (row["prompt_tokens"] or 0) - (row["cached_tokens"] or 0)
    # the proxy's own release reason when it logs one, else a guess from
    # the time held
    starved = {x["id"] for x in rows
               if (x["row"]["release"] == "starved" if x["row"]["release"] != "-"
                   else x["row"]["queue_ms"] >= starve - 1)}
    leg_of = {leg[3]: leg for leg in legs}

    out = []
    for x in rows:
        row, pr, dr = x["row"], pre_rec.get(x["id"]), dec_rec.get(x["id"])
        c = {k: 0.0 for k, _ in CAUSES}
        held = row["queue_ms"]
        a, s = x["arrive"], x["send"]
        idle = overlap(a, s, idle_any) * 1000.0
        ahead = merge([(leg_of[j["id"]][1], leg_of[j["id"]][2]) for j in rows
                       if j["id"] in starved and j["id"] != x["id"]
                       and a < j["send"] < s and work[j["id"]] > work[x["id"]]
                       and j["id"] in leg_of])
        starv = overlap(a, s, minus(ahead, idle_any)) * 1000.0
        c["idle"], c["starved"] = idle, starv
        c["wait"] = max(0.0, held - idle - starv)
        leg = row["prefill_ms"] or 0
        after = x["ttft_ms"] - held - leg
        if pr is not None and row["prefill_ms"] is not None:
            prompt, hit = int(pr["prompt_tokens"]), int(pr.get("cached_tokens") or 0)
            queue_e = (pr.get("queue_s") or 0.0) * 1000.0
            service = ((pr.get("ttft_s") or 0.0) - (pr.get("queue_s") or 0.0)) * 1000.0
            alone = bound_alone(cluster, prompt, hit)
            expect_hit = min(row["cached_tokens"] or 0, prompt - 1)
            wrong = max(0.0, alone - bound_alone(cluster, prompt, expect_hit)) \
                if expect_hit > hit else 0.0
            # the engine's time beyond the model's is shared steps; below it
            # (float noise, a hit the record undercounts) comes off its own work
            own = max(0.0, alone - wrong - max(0.0, alone - service))
            # the engine queueing the proxy predicted at release (or, not
            # logged, the hold slack) is waiting; beyond it, a misprediction
            expect_q = slack if row["prefill_pred_wait_ms"] is None \
                else max(slack, float(row["prefill_pred_wait_ms"]))
            c["wait"] += min(queue_e, expect_q)
            c["mispredict"] = max(0.0, queue_e - expect_q) + wrong
            c["shared"] = max(0.0, service - alone)
            c["prefill"] = own
            if row["mode"] != "parallel":
                c["overhead"] += leg - (pr.get("ttft_s") or 0.0) * 1000.0
        else:
            c["prefill"] = leg
        if row["mode"] == "parallel" and pr is not None:
            # both legs left at the send; the prefill leg's answer came after
            # the KV transfer: what follows the engine's end of the prompt is
            # the transfer and the first decode step (and the hop back)
            hop = max(0.0, (pr["arrival_unix"] - x["send"]) * 1000.0) \
                if pr.get("arrival_unix") is not None else 0.0
            c["overhead"] += hop
            rest = x["ttft_ms"] - held - hop - (pr.get("ttft_s") or 0.0) * 1000.0
            c["decode"] = max(0.0, rest)
            c["overhead"] += rest - c["decode"]
        elif row["mode"] == "aggregated":     # the leg ended at the first token
            c["overhead"] += after
        elif dr is not None:
            c["decode"] = (dr.get("ttft_s") or 0.0) * 1000.0
            c["overhead"] += after - c["decode"]
        else:
            c["decode"] = after
        # the engines' front ends tokenizing a text prompt (the simulator's
        # records; a prompt sent as ids has none) came out of the hops: its
        # own cause. The decode leg's counts in sequential P/D only (in
        # parallel it overlaps the prefill)
        tok = ((pr or {}).get("tokenize_s") or 0.0) * 1000.0
        if row["mode"] == "sequential":
            tok += ((dr or {}).get("tokenize_s") or 0.0) * 1000.0
        c["tokenize"] = min(tok, max(0.0, c["overhead"]))
        c["overhead"] -= c["tokenize"]
        out.append({"index": x["index"], "id": x["id"], "ttft_ms": x["ttft_ms"],
                    "prefill_instance": row["prefill"], "prompt_tokens": row["prompt_tokens"],
                    "cached_tokens_index": row["cached_tokens"],
                    "cached_tokens_engine": pr.get("cached_tokens") if pr else None,
                    "queue_ms": held, "prefill_ms": row["prefill_ms"],
                    "prefill_pred_ms": row["prefill_pred_ms"],
                    "starved": x["id"] in starved, "release": row["release"],
                    "causes_ms": c})

    total = sum(r["ttft_ms"] for r in out)
    totals = {k: sum(r["causes_ms"][k] for r in out) for k, _ in CAUSES}
    n_starved = len(starved)
    proxy_starved = ((status or {}).get("queues") or {}).get("released_by_starvation_timeout")
    logged = any(r["release"] != "-" for r in out)
    if proxy_starved is not None and proxy_starved != n_starved:
        notes.append(
            f"{n_starved} requests released as starved (the log's release reason); "
            f"/omni/status counts {proxy_starved}, those that went ahead of the "
            f"request the order put first" if logged else
            f"{n_starved} requests waited at least the starvation timeout "
            f"({starve:g} ms); /omni/status counts {proxy_starved} released by it")
    pred = [(r["prefill_pred_ms"], r["prefill_ms"]) for r in out
            if r["prefill_pred_ms"] is not None and r["prefill_ms"]]
    mape = sum(abs(p - m) / m for p, m in pred) / len(pred) if pred else None
    res = {"run_dir": run_dir, "run_id": run_id, "requests": out,
           "ttft_ms_total": total, "totals_ms": totals,
           "shares": {k: v / total if total else 0.0 for k, v in totals.items()},
           "hold_slack_ms": slack, "starvation_timeout_ms": starve,
           "released_by_starvation": n_starved, "prefill_duration_mape": mape,
           "cluster": cluster.describe() if cluster else None,
           "release_reasons": _count(r["release"] for r in out),
           "release_reasons_logged": logged,
           "handovers": handovers(pre_rec, {row["id"]: _arrival(row) for row in log
                                            if row["total_ms"] is not None}),
           "notes": notes, "missing": _missing(log)}
    res["markdown"] = markdown(res, worst)
    return res


def handovers(pre_rec: dict, arrivals: dict) -> dict | None:
    """Where a prefill instance idled although the request it ran next had
    already reached the proxy: from the end of the engine's prefills so far
    (their first tokens) to the start of that request's prefill (after the
    engine's queue). What fills it: the answer's way back, the release,
    the next body's way to the engine and its reading there. The bounds'
    model has none (docs/scheduler.md, "What a handover costs"). None
    without the simulator's engine-side times."""
    by_inst = {}
    for rid, r in pre_rec.items():
        if r.get("arrival_unix") is None:
            continue
        by_inst.setdefault(r.get("instance"), []).append(
            (r["arrival_unix"] + (r.get("queue_s") or 0.0),
             r["arrival_unix"] + (r.get("ttft_s") or 0.0), rid))
    if not by_inst:
        return None
    gaps, lo, hi = [], float("inf"), float("-inf")
    for ivs in by_inst.values():
        ivs.sort()
        lo, hi = min(lo, ivs[0][0]), max(hi, max(e for _, e, _ in ivs))
        done = ivs[0][1]
        for start, end, rid in ivs[1:]:
            arrived = arrivals.get(rid)
            if start > done and arrived is not None and arrived < done:
                gaps.append(start - done)
            done = max(done, end)
    span = max(hi - lo, 1e-9) * len(by_inst)
    gaps.sort()
    return {"count": len(gaps), "total_s": sum(gaps),
            "median_ms": gaps[len(gaps) // 2] * 1000.0 if gaps else 0.0,
            "share": sum(gaps) / span, "instances": len(by_inst)}


def _engine_end(pr, send):
    """When the prefill engine was done with a prompt (Unix s): its arrival
    there (else the send) plus its time to the first token there."""
    start = pr.get("arrival_unix")
    return (send if start is None else start) + (pr.get("ttft_s") or 0.0)


def bound_alone(cluster, prompt, hit):
    """The prefill of prompt - hit tokens alone, in ms (the preset's model)."""
    if cluster is None:
        return 0.0
    return bound.prefill_alone(cluster, prompt - hit, hit) * 1000.0


def markdown(res: dict, worst: int = 10) -> str:
    n = len(res["requests"])
    lines = [f"{n} requests of {res['run_dir']} (ids {res['run_id']}-N), mean TTFT "
             f"{res['ttft_ms_total'] / n:.0f} ms"
             + (f"; cost model: {res['cluster']}" if res["cluster"] else ""), "",
             "| cause | share | mean ms per request | requests with > 1 ms |",
             "|---|---|---|---|"]
    for k, name in CAUSES:
        hit = sum(1 for r in res["requests"] if r["causes_ms"][k] > 1.0)
        lines.append(f"| {name} | {100 * res['shares'][k]:.1f}% | "
                     f"{res['totals_ms'][k] / n:.1f} | {hit} |")
    lines += ["", f"hold slack {res['hold_slack_ms']:g} ms, starvation timeout "
              f"{res['starvation_timeout_ms']:g} ms ({res['released_by_starvation']} "
              + ("released as starved)" if res["release_reasons_logged"]
                 else "requests waited that long)")
              + (f"; predicted prefill leg vs measured: MAPE "
                 f"{100 * res['prefill_duration_mape']:.1f}%"
                 if res["prefill_duration_mape"] is not None else ""), ""]
    ho = res.get("handovers")
    if ho and ho["count"]:
        lines += [f"handovers: {ho['count']} times a prefill instance idled while the "
                  f"request it ran next was already at the proxy, {ho['total_s']:.2f} s "
                  f"in all ({100 * ho['share']:.1f}% of the {ho['instances']} prefill "
                  f"instances' time), median {ho['median_ms']:.1f} ms: the answer's way "
                  f"back, the release, the next body's way into the engine (the bounds "
                  f"have none)", ""]
    reasons = {k: v for k, v in res.get("release_reasons", {}).items() if k != "-"}
    if reasons:
        lines += ["released (the proxy's $omni_release_reason): "
                  + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())), ""]
    top = sorted(res["requests"], key=lambda r: -r["ttft_ms"])[:worst]
    if top:
        lines += [f"The {len(top)} slowest (ms):", "",
                  "| request | TTFT | prompt | hit (index/engine) | "
                  + " | ".join(name for _, name in CAUSES) + " |",
                  "|" + "---|" * (4 + len(CAUSES))]
        for r in top:
            eng = r["cached_tokens_engine"]
            lines.append(f"| {r['index']} | {r['ttft_ms']:.0f} | {r['prompt_tokens']} | "
                         f"{r['cached_tokens_index']}/{'-' if eng is None else eng} | "
                         + " | ".join(f"{r['causes_ms'][k]:.0f}" for k, _ in CAUSES) + " |")
    for note in res["notes"]:
        lines.append(f"\nNote: {note}.")
    lines += ["", "Not recorded, so approximated (docs/scheduler.md):"]
    lines += [f"- {m}" for m in res["missing"]]
    return "\n".join(lines) + "\n"
