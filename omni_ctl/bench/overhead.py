"""`omni-ctl bench-overhead`: what a router costs per request.

One canned backend (nginx answering every request with one fixed completion,
including `kv_transfer_params` so P/D routers run both legs) listens on four
loopback ports: two play prefill instances, two decode instances. Each target
is started in front of it in turn and loaded with wrk (POST bodies of the
given sizes, non-streaming), side by side in one run:

    direct            wrk -> backend (the ceiling; shows wrk is not the limit)
    nginx             plain nginx proxy_pass, round robin over 2 ports
    nginx-mirror      the same, each request also sent whole to the 2 other
                      ports (nginx's mirror): two legs carrying the prompt,
                      the floor for a P/D mode without any scheduling
    omni-aggregated   Omni Proxy, one tier
    omni-aggregated-ll  the same with --schedule-policy least-loaded (the
                      request path alone: no prefix index, no holding)
    omni-sequential   Omni Proxy, vLLM-style P/D (prefill leg, then decode leg)
    omni-parallel     Omni Proxy, SGLang-style P/D (both legs at once)
    omni-sequential-tok  omni-sequential with --model-path: every prompt
                      tokenized by the tokenizer sidecar and forwarded as ids
                      (needs --model-path; the run also times the engine-side
                      tokenization this replaces, transformers in-process)
    vllm-router-pd    vllm-router --vllm-pd-disaggregation, cache_aware prefill
    sglang-router-pd  sglang-router --pd-disaggregation, cache_aware prefill
    vllm-router-rr    vllm-router, plain round robin over 2 ports
    sglang-router-rr  sglang-router, plain round robin over 2 ports
    vllm-router-ca    vllm-router, plain, cache_aware (its default policy)
    sglang-router-ca  sglang-router, plain, cache_aware (its default policy)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from . import omni, peers, procs
from .errors import BenchError
from .workloads import content_key, text_block, token_block

TARGETS = ("direct", "nginx", "nginx-mirror", "omni-aggregated", "omni-aggregated-ll",
           "omni-sequential", "omni-parallel", "omni-sequential-tok",
           "vllm-router-pd", "sglang-router-pd", "vllm-router-rr", "sglang-router-rr",
           "vllm-router-ca", "sglang-router-ca")

CANNED_BODY = json.dumps({
    "id": "cmpl-canned", "object": "text_completion", "created": 0, "model": "canned",
    "choices": [{"index": 0, "text": "ok", "finish_reason": "length", "logprobs": None}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                           "remote_block_ids": [1], "remote_engine_id": "canned",
                           "remote_request_id": "canned", "remote_host": "127.0.0.1",
                           "remote_port": 5600, "tp_size": 1}},
    separators=(",", ":"))

BOOTSTRAP_PORTS = (8998, 8999)


class Skip(Exception):
    """A target that cannot run here; the message says why."""


def parse_sizes(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", item)
        if not m or int(m.group(1)) == 0:
            raise BenchError(f"--sizes: cannot read '{item.strip()}' in '{text}' "
                             f"(write e.g. 1k,16k,200k)")
        out.append(int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[
            m.group(2).lower()])
    return out


def size_label(n: int) -> str:
    return f"{n // 1024} KB" if n % 1024 == 0 else f"{n} B"


def make_body(size: int, kind: str = "text") -> bytes:
    """A non-streaming completion request of exactly `size` bytes (text) or
    at most `size` bytes (token ids)."""
    base = {"model": "canned", "prompt": "", "max_tokens": 16, "stream": False,
            "temperature": 0}
    empty = len(json.dumps(base, separators=(",", ":")))
    room = size - empty
    if room < 1:
        raise BenchError(f"--sizes: {size} bytes is smaller than an empty request")
    if kind == "tokens":
        ids, used = [], 2                      # "[" and "]" replace '""'
        for t in token_block(content_key("overhead", size), room // 5 + 1):
            used += len(str(t)) + (1 if ids else 0)
            if used > room + 2:
                break
            ids.append(t)
        base["prompt"] = ids
    else:
        words = text_block(content_key("overhead", size), room // 3 + 1)
        base["prompt"] = words[:room]
    return json.dumps(base, separators=(",", ":")).encode()


# --- wrk --------------------------------------------------------------------------

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str) -> dict:
    """Requests/s, latency percentiles and errors from `wrk --latency` output."""
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise BenchError(f"wrk printed no Requests/sec:\n{text[-1500:]}")
    out = {"rps": float(m.group(1))}
    for pct, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text,
                                       re.M):
        out[f"p{pct}_ms"] = float(value) * _UNIT_MS[unit]
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                  text)
    out["socket_errors"] = sum(map(int, m.groups())) if m else 0
    return out


def wrk_binary() -> str:
    path = shutil.which("wrk") or "/usr/bin/wrk"
    if not os.access(path, os.X_OK):
        raise BenchError("wrk not found: install it (apt-get install wrk)")
    return path


def run_wrk(url: str, body_path: str, duration: float, connections: int,
            threads: int) -> dict:
    """wrk POSTing the body file for `duration` seconds (whole seconds, >= 1)."""
    lua = body_path + ".lua"
    if any(c in body_path for c in "\"\\\n"):
        raise BenchError(f"unusable path for wrk's script: {body_path}")
    with open(lua, "w") as f:
        f.write('wrk.method = "POST"\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
                f'local f = assert(io.open("{body_path}", "rb"))\n'
                'wrk.body = f:read("*a")\nf:close()\n')
    argv = [wrk_binary(), "-t", str(threads), "-c", str(connections),
            "-d", f"{max(1, round(duration))}s", "--latency", "-s", lua, url]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from None
    if res.returncode != 0:
        raise BenchError(f"wrk failed ({res.returncode}): "
                         f"{(res.stderr or res.stdout).strip()}")
    return parse_wrk(res.stdout)


# --- the proxy's state between rounds ------------------------------------------------

def idle_state(status_url: str, timeout: float = 10.0) -> dict:
    """Omni Proxy's /omni/status once nothing is in flight (wrk has gone):
    what the round left behind.  `settled` is False when requests or tokens
    were still charged at the deadline; `prefill_jobs` counts the predictor
    jobs still in flight (0 when every way a leg ended gave its job back);
    `held_total`/`decisions` are the zone's counters (deltas between rounds:
    how many requests were held, how many release decisions were taken)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(status_url, timeout=5) as resp:
                st = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise BenchError(f"{status_url}: {exc}") from None
        insts = st.get("instances", [])
        charged = st["totals"]["inflight_requests"] + sum(
            i["inflight_requests"] + i["inflight_tokens"] for i in insts)
        if charged == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    pred = [i.get("predictor", {}) for i in insts if i.get("role") == "prefill"
            or st.get("pd_policy") == "aggregated"]
    return {"settled": charged == 0,
            "inflight_requests": st["totals"]["inflight_requests"],
            "prefill_jobs": sum(p.get("prefills_in_flight", 0) for p in pred),
            "predicted_busy_ms": max([p.get("predicted_free_in_ms", 0) for p in pred]
                                     or [0]),
            "held_total": st["queues"]["held_total"],
            "decisions": st["scheduler"]["decisions"],
            # the most policy decisions one held request had so far (None:
            # a build without the counter)
            "held_decisions_max": st["scheduler"].get("held_decisions_max"),
            "requests": st["totals"]["requests"]}


def leaks(runs: list[dict]) -> list[dict]:
    """Rounds after which an idle Omni Proxy still had load charged or
    predicted prefill work in flight: the state that makes later rounds
    collapse (docs/internals.md, "Parallel mode under load")."""
    return [{"target": r["target"], "size": r["size"], "round": r["round"],
             **r["after"]}
            for r in runs if r.get("after") and (not r["after"]["settled"]
                                                  or r["after"]["prefill_jobs"]
                                                  or r["after"]["predicted_busy_ms"])]


# --- targets ------------------------------------------------------------------------

def start_target(name: str, tmp: str, backend_ports: list[int], workers: int,
                 port: int, probe: bytes, module_dir: str | None = None,
                 model_path: str | None = None, omni_args=()):
    """Start target `name` on `port` and wait until it answers; return
    (url, process or None for "direct"). The caller stops the process."""
    urls = [f"http://127.0.0.1:{p}" for p in backend_ports]
    prefill = [f"127.0.0.1:{p}" for p in backend_ports[:2]]
    decode = [f"127.0.0.1:{p}" for p in backend_ports[2:]]
    url = f"http://127.0.0.1:{port}"
    if name == "direct":
        return urls[0], None
    prefix = os.path.join(tmp, name)
    os.makedirs(prefix, exist_ok=True)
    if name in ("nginx", "nginx-mirror"):
        conf = procs.render_plain_nginx(prefix, [port], mode="proxy", workers=workers,
                                        upstreams=prefill, start_core=0,
                                        mirror=decode if name == "nginx-mirror" else ())
        proc = procs.start_nginx(name, conf, prefix)
    elif name.startswith("omni-"):
        mode, _, variant = name[len("omni-"):].partition("-")
        extra = ["--access-log-file", "off", *omni_args]    # as plain nginx
        if variant == "ll":
            extra += ["--schedule-policy", "least-loaded"]
        if variant == "tok":
            if not model_path:
                raise Skip("needs --model-path (a tokenizer directory)")
            extra += ["--model-path", os.path.abspath(model_path)]
        try:
            proc = omni.start_proxy(prefix, port, mode, workers=workers,
                                    prefill=prefill if mode != "aggregated" else [],
                                    decode=decode if mode != "aggregated" else prefill,
                                    bootstrap_ports=BOOTSTRAP_PORTS,
                                    module_dir=module_dir, extra=extra)
        except omni.NotAvailable as exc:
            raise Skip(str(exc)) from None
    else:
        router = name.rsplit("-", 1)[0]
        binary = procs.venv_bin(router)
        if binary is None:
            raise Skip(f"{router} is not installed (pip install .[peers])")
        argv = peer_argv(name, binary, port, urls)
        proc = procs.Proc(name, argv, os.path.join(prefix, "router.log"))
    try:
        procs.wait_http(proc, url + "/v1/completions", probe, timeout=60, what=name)
    except BaseException:
        proc.stop()
        raise
    return url, proc


def peer_argv(name: str, binary: str, port: int, urls: list[str]) -> list[str]:
    """P/D with cache_aware prefill over ports 0-1 (prefill) and 2-3 (decode),
    or plain (-rr: round robin, -ca: cache_aware) over ports 0-1."""
    router = name.rsplit("-", 1)[0]
    if name.endswith("-pd"):
        return peers.peer_argv(router, binary, port, prefill=urls[:2],
                               bootstrap_ports=BOOTSTRAP_PORTS, decode=urls[2:])
    policy = "cache_aware" if name.endswith("-ca") else "round_robin"
    return peers.peer_argv(router, binary, port, workers=urls[:2], policy=policy)


# --- tokenization: the proxy's sidecar against the engine's own ------------------

def tokenize_counts(status_url: str) -> dict:
    """Omni Proxy's tokenize counters: requests scheduled on the tokenizer's
    ids, and fallbacks to the estimate by reason."""
    try:
        with urllib.request.urlopen(status_url, timeout=5) as resp:
            tok = json.loads(resp.read())["tokenize"]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise BenchError(f"{status_url}: {exc}") from None
    return {"tokenized": tok["tokenized"], **tok["fallback"]}


def tokenize_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


def engine_tokenize_cost(model_path: str, bodies: dict, requests: int = 20,
                         max_seconds: float = 20.0) -> list[dict]:
    """Per size: what an engine spends tokenizing the body's prompt itself
    (the model's tokenizer through transformers, in this process, as vLLM's
    front end encodes a completions prompt), p50/p99/mean ms over up to
    `requests` encodes."""
    from transformers import AutoTokenizer

    from ..tokenizer import bench as tokbench

    tok = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    rows = []
    for size, path in bodies.items():
        with open(path, "rb") as f:
            prompt = json.loads(f.read())["prompt"]
        if not isinstance(prompt, str):
            continue            # token-id prompts: nothing for an engine to do
        times = tokbench._timed(lambda: tok.encode(prompt), requests, max_seconds)
        rows.append(tokbench._summary("engine tokenize", times, size=size,
                                      tokens=len(tok.encode(prompt))))
    return rows


def parse_targets(text: str | None) -> list[str]:
    if not text:
        return list(TARGETS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise BenchError(f"--targets: unknown '{','.join(bad) or text}' "
                         f"(known: {', '.join(TARGETS)})")
    return names


def run_overhead(sizes="1k,16k,200k", targets=None, duration=3, connections=32,
                 wrk_threads=1, workers=1, backend_workers=1, base_port=0,
                 out_dir="bench-out/overhead", keep_dir=False, prompt_kind="text",
                 warmup=1, repeat=3, omni_module_dir=None, model_path=None,
                 omni_args="", log=None) -> dict:
    """Measure every target at every size; write overhead.json and .md.

    All targets run at once (each on its own port, idle while not measured),
    and the measurements are interleaved: `repeat` rounds, each going over
    every size and every target (in a rotated order). A busy machine then
    slows every target alike, and the median of the rounds is reported."""
    log = log or (lambda msg: None)
    omni_args = shlex.split(omni_args) if isinstance(omni_args, str) else list(omni_args)
    size_list = parse_sizes(sizes)
    names = parse_targets(targets)
    if duration < 1 or connections < 1 or wrk_threads < 1 or workers < 1 or repeat < 1:
        raise BenchError("--duration, --connections, --wrk-threads, --workers and "
                         "--repeat must be at least 1")
    wrk_binary()
    n_ports = 4 + len(names)
    ports = list(range(base_port, base_port + n_ports)) if base_port \
        else procs.free_ports(n_ports)
    backend_ports = ports[:4]
    tmp = tempfile.mkdtemp(prefix="omni-overhead-")
    bodies = {}
    for size in size_list:
        bodies[size] = os.path.join(tmp, f"body-{size}.json")
        with open(bodies[size], "wb") as f:
            f.write(make_body(size, prompt_kind))
    runs, skipped = [], []
    engine_tok = engine_tokenize_cost(model_path, bodies) \
        if model_path and any(n.endswith("-tok") for n in names) else []
    for row in engine_tok:
        log(f"[overhead] engine-side tokenization {size_label(row['size'])}: "
            f"p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms "
            f"({row['tokens']} tokens)")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = os.getloadavg()
    try:
        with contextlib.ExitStack() as stack:
            prefix = os.path.join(tmp, "backend")
            conf = procs.render_plain_nginx(prefix, backend_ports, mode="canned",
                                            workers=backend_workers,
                                            canned_body=CANNED_BODY)
            backend = stack.enter_context(procs.start_nginx("canned backend", conf, prefix))
            probe = make_body(1024, prompt_kind)
            procs.wait_http(backend, f"http://127.0.0.1:{backend_ports[0]}/v1/completions",
                            probe, timeout=15, what="canned backend")
            live = {}
            for name, port in zip(names, ports[4:]):
                try:
                    url, proc = start_target(name, tmp, backend_ports, workers, port,
                                             probe, omni_module_dir, model_path,
                                             omni_args)
                except Skip as exc:
                    log(f"[overhead] {name}: skipped: {exc}")
                    skipped.append({"target": name, "skipped": str(exc)})
                    continue
                if proc is not None:
                    stack.callback(proc.stop)
                live[name] = url + "/v1/completions"
                log(f"[overhead] {name}: {url}")
            order = list(live)
            status = {name: url[:-len("/v1/completions")] + "/omni/status"
                      for name, url in live.items() if name.startswith("omni-")}
            last, tok_last = {}, {}
            for name in order:
                if warmup:
                    run_wrk(live[name], bodies[size_list[0]], warmup, connections,
                            wrk_threads)
                if name in status:
                    last[name] = idle_state(status[name])
                if name.endswith("-tok"):
                    tok_last[name] = tokenize_counts(status[name])
            for rnd in range(repeat):
                for size in size_list:
                    k = rnd % len(order) if order else 0
                    for name in order[k:] + order[:k]:
                        r = run_wrk(live[name], bodies[size], duration, connections,
                                    wrk_threads)
                        note = ""
                        if name in status:
                            after = idle_state(status[name])
                            done = max(1, after["requests"] - last[name]["requests"])
                            r["after"] = after
                            # holds per request (sequential mode may hold one
                            # request twice: before prefill and before decode)
                            r["held_share"] = (after["held_total"]
                                               - last[name]["held_total"]) / done
                            r["decisions_per_request"] = (after["decisions"]
                                                          - last[name]["decisions"]) / done
                            last[name] = after
                            note = (f", held {r['held_share']:.0%}, "
                                    f"{r['decisions_per_request']:.1f} decisions/req, "
                                    f"idle after: {after['prefill_jobs']} prefill "
                                    f"job(s) predicted in flight")
                            if after.get("held_decisions_max") is not None:
                                note += (f", at most {after['held_decisions_max']} "
                                         f"decisions for one held request")
                        log(f"[overhead] round {rnd + 1}/{repeat} {name} "
                            f"{size_label(size)}: {r['rps']:.0f} req/s, "
                            f"p50 {r.get('p50_ms', 0):.2f} ms, "
                            f"p99 {r.get('p99_ms', 0):.2f} ms{note}")
                        if name in tok_last:
                            now = tokenize_counts(status[name])
                            r["tokenize"] = tokenize_delta(tok_last[name], now)
                            tok_last[name] = now
                            log(f"[overhead]   tokenized {r['tokenize']['tokenized']}, "
                                "fallbacks " + ", ".join(
                                    f"{k} {v}" for k, v in r["tokenize"].items()
                                    if k != "tokenized"))
                        runs.append({"target": name, "size": size, "round": rnd, **r})
    finally:
        if not keep_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"started": started, "sizes": size_list, "duration_s": duration,
              "repeat": repeat, "connections": connections, "wrk_threads": wrk_threads,
              "workers": workers, "backend_workers": backend_workers,
              "prompt_kind": prompt_kind, "cpus": os.cpu_count(),
              "load_average": {"start": load_start, "end": os.getloadavg()},
              "omni_module": omni.module_label(omni_module_dir), "omni_args": omni_args,
              "rows": median_rows(runs) + skipped, "runs": runs,
              "engine_tokenize": engine_tok, "tokenize": tokenize_rows(runs),
              "collapses": collapses(runs), "leaks": leaks(runs),
              "tmp_dir": tmp if keep_dir else None}
    result["markdown"] = markdown_overhead(result)
    os.makedirs(out_dir, exist_ok=True)
    result["json_path"] = os.path.join(out_dir, "overhead.json")
    with open(result["json_path"], "w") as f:
        json.dump({k: v for k, v in result.items() if k != "markdown"}, f, indent=2)
    with open(os.path.join(out_dir, "overhead.md"), "w") as f:
        f.write(result["markdown"])
    return result


def tokenize_rows(runs: list[dict]) -> list[dict]:
    """Per tokenizing target and size, the rounds' tokenize counters summed:
    how many requests the sidecar tokenized and how many fell back."""
    out: dict[tuple, dict] = {}
    for r in runs:
        if "tokenize" in r:
            row = out.setdefault((r["target"], r["size"]),
                                 {"target": r["target"], "size": r["size"]})
            for k, v in r["tokenize"].items():
                row[k] = row.get(k, 0) + v
    return list(out.values())


def median_rows(runs: list[dict]) -> list[dict]:
    """One row per (target, size): medians over the rounds, the range of
    requests/s, and error counts summed."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["size"]), []).append(r)
    rows = []
    for (target, size), rs in groups.items():
        row = {"target": target, "size": size, "rounds": len(rs),
               "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs),
               "non_2xx": sum(r["non_2xx"] for r in rs),
               "socket_errors": sum(r["socket_errors"] for r in rs)}
        for key in ("rps", "p50_ms", "p99_ms"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = statistics.median(vals) if vals else None
        rows.append(row)
    return rows


def collapses(runs: list[dict], ratio: float = 0.5) -> list[dict]:
    """Rounds that fell below `ratio` x the median of the same target and
    size's other rounds: a stall, not noise (noise is tens of percent)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["size"]), []).append(r)
    out = []
    for (target, size), rs in groups.items():
        for r in rs:
            others = [o["rps"] for o in rs if o is not r]
            if not others:
                continue
            ref = statistics.median(others)
            if ref > 0 and r["rps"] < ratio * ref:
                out.append({"target": target, "size": size, "round": r["round"],
                            "rps": r["rps"], "others_median": ref})
    return out


def markdown_overhead(result: dict) -> str:
    sizes = result["sizes"]
    head = ["target"] + [f"{size_label(s)} {c}" for s in sizes
                         for c in ("req/s", "p50 ms", "p99 ms")]
    rounds = result.get("repeat", 1)
    intro = ([f"Median of {rounds} interleaved rounds of {result['duration_s']} s each "
              f"(req/s range in brackets); wrk {result['wrk_threads']} thread(s), "
              f"{result['connections']} connections.", ""] if rounds > 1 else [])
    lines = intro + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped = []
    by_target: dict[str, dict] = {}
    for r in result["rows"]:
        if "skipped" in r:
            skipped.append(f"- {r['target']}: skipped: {r['skipped']}")
        else:
            by_target.setdefault(r["target"], {})[r["size"]] = r
    for name, cells in by_target.items():
        row = [name]
        for s in sizes:
            c = cells.get(s)
            if c is None:
                row += ["-", "-", "-"]
                continue
            errs = c["non_2xx"] + c["socket_errors"]
            spread = (f" ({c['rps_min']:.0f}-{c['rps_max']:.0f})"
                      if c.get("rounds", 1) > 1 else "")
            row += [f"{c['rps']:.0f}{spread}" + (f", {errs} errors" if errs else ""),
                    f"{c.get('p50_ms', float('nan')):.2f}",
                    f"{c.get('p99_ms', float('nan')):.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    for t in result.get("tokenize", []):
        fell = {k: v for k, v in t.items() if k not in ("target", "size", "tokenized") and v}
        skipped.append(f"{t['target']} {size_label(t['size'])}: {t['tokenized']} requests "
                       f"tokenized by the sidecar, fallbacks to the estimate: "
                       + (", ".join(f"{k} {v}" for k, v in fell.items()) or "none"))
    for e in result.get("engine_tokenize", []):
        skipped.append(f"engine-side tokenization it replaces, {size_label(e['size'])} "
                       f"({e['tokens']} tokens): p50 {e['p50_ms']:.2f} ms, p99 "
                       f"{e['p99_ms']:.2f} ms, mean {e['mean_ms']:.2f} ms ({e['n']} encodes)")
    mod = result.get("omni_module") or {}
    if any(r["target"].startswith("omni-") and "skipped" not in r for r in result["rows"]):
        flavor = {"1": "debug build with sanitizers", "0": "release build"}.get(
            mod.get("debug"), "build type unknown")
        skipped.append(f"Omni Proxy module: {mod.get('module_dir')} ({flavor})"
                       + (f", gen-conf {shlex.join(result['omni_args'])}"
                          if result.get("omni_args") else ""))
    for c in result.get("collapses", []):
        skipped.append(f"**COLLAPSE**: {c['target']} {size_label(c['size'])} round "
                       f"{c['round'] + 1}: {c['rps']:.0f} req/s, under half of the other "
                       f"rounds' median {c['others_median']:.0f}")
    for c in result.get("leaks", []):
        skipped.append(f"**LEAK**: {c['target']} {size_label(c['size'])} after round "
                       f"{c['round'] + 1}, idle: {c['prefill_jobs']} prefill job(s) "
                       f"predicted in flight, predicted busy {c['predicted_busy_ms']} ms, "
                       f"{c['inflight_requests']} request(s) in flight"
                       + ("" if c["settled"] else ", load still charged"))
    return "\n".join(lines + [""] + skipped) + "\n"
