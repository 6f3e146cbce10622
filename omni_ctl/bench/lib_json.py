"""Throughput of the JSON scanner/splicer on request-sized bodies.

``bench_json(seconds)`` is a plain function (``omni-ctl bench-lib`` calls it).
It drives the C library through the raw cffi ``lib`` with every buffer
allocated once, so a 200 KB body costs one call per step and the Python call
overhead (about a microsecond) is amortised over ~50+ microseconds of work.

Bodies (deterministic, about 200 KB each):

- ``chat``:   a chat completion whose user message is long English-like
  text with ``\\n`` and ``\\"`` escapes and an occasional non-ASCII word;
- ``tokens``: a completion whose ``prompt`` is a token-id array
  ``[12, 3456, ...]`` (the tokenize-once path);
- ``chat_cjk``: like ``chat`` but the text is mostly 3-byte UTF-8 (CJK),
  the slow path of UTF-8 validation; reported for honesty, not a target.

Steps measured per body: ``scan`` (validate + top-level members),
``scan_plan`` (+ the prefill-leg edits as segments, what nginx sends) and
``scan_apply`` (+ the edited body written into one buffer); for ``tokens``
also ``scan_u32`` (scan + extracting the prompt as uint32).  Rates are in
MB/s of input with MB = 10**6 bytes: ``best`` is the fastest of the
batches (least disturbed by other load), ``median`` their median.
"""

import random
import statistics
import time

from ..scoring import ffi, lib

__all__ = ["bench_json", "make_bodies", "format_json_bench"]

BODY_BYTES = 200_000

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or "
    "his from at which but have an they you were her she there been one all "
    "model token prefix cache decode prefill instance request latency batch "
    "schedule stream throughput memory kernel attention layer weight tensor "
    "please explain summarize following document carefully step answer "
    "question context section paragraph example result function value"
).split()
_RARE = ["café", "naïve", "Zürich", "—", "…", "’s", "résumé", "€5"]

KV_TRANSFER = (b'{"do_remote_decode": true, "do_remote_prefill": false, '
               b'"remote_engine_id": null, "remote_block_ids": null, '
               b'"remote_host": null, "remote_port": null}')


def _text(rnd, nbytes, cjk=False):
    parts = []
    size = 0
    line = 0
    while size < nbytes:
        if cjk:
            word = "".join(chr(rnd.randrange(0x4E00, 0x9FA5)) for _ in range(rnd.randrange(1, 6)))
            if rnd.random() < 0.15:
                word = rnd.choice(_WORDS)
        else:
            word = rnd.choice(_RARE) if rnd.random() < 0.01 else rnd.choice(_WORDS)
            if rnd.random() < 0.005:
                word = '\\"' + word + '\\"'
        parts.append(word)
        size += len(word.encode()) + 1
        line += len(word) + 1
        if line > 100:
            parts.append("\\n")
            size += 2
            line = 0
    return " ".join(parts)


def _chat_body(rnd, cjk=False):
    head = ('{"model": "deepseek-ai/DeepSeek-V3", "messages": [{"role": "system", '
            '"content": "You are a helpful assistant. Answer concisely."}, '
            '{"role": "user", "content": "')
    tail = ('"}], "stream": true, "stream_options": {"include_usage": true}, '
            '"max_tokens": 256, "temperature": 0.7, "top_p": 0.95}')
    need = BODY_BYTES - len(head.encode()) - len(tail.encode())
    text = _text(rnd, need, cjk).encode()[:need]
    # cut on a whole character and not inside an escape
    text = text.decode("utf-8", "ignore").rstrip("\\").encode()
    return head.encode() + text + tail.encode()


def _tokens_body(rnd):
    head = b'{"model": "deepseek-ai/DeepSeek-V3", "prompt": ['
    tail = b'], "max_tokens": 256, "stream": true, "min_tokens": 10}'
    ids = []
    size = len(head) + len(tail)
    while size < BODY_BYTES:
        tok = str(rnd.randrange(0, 129280)).encode()
        ids.append(tok)
        size += len(tok) + 2
    return head + b", ".join(ids) + tail


def make_bodies(seed=1):
    """The benchmark bodies: {name: bytes}."""
    rnd = random.Random(seed)
    return {"chat": _chat_body(rnd), "tokens": _tokens_body(rnd),
            "chat_cjk": _chat_body(rnd, cjk=True)}


def _edits():
    """The sequential-mode prefill edits (PROTOCOLS.md section 2)."""
    spec = [(lib.OMNI_JSON_SET, b"max_tokens", b"1"),
            (lib.OMNI_JSON_SET, b"stream", b"false"),
            (lib.OMNI_JSON_DELETE, b"stream_options", None),
            (lib.OMNI_JSON_DELETE, b"min_tokens", None),
            (lib.OMNI_JSON_SET, b"kv_transfer_params", KV_TRANSFER)]
    arr = ffi.new("omni_json_edit_t[]", len(spec))
    keep = []
    for i, (op, key, value) in enumerate(spec):
        k = ffi.from_buffer("char[]", key)
        keep.append(k)
        arr[i].op = op
        arr[i].key = k
        arr[i].key_len = len(key)
        if value is not None:
            v = ffi.from_buffer("uint8_t[]", value)
            keep.append(v)
            arr[i].value = v
            arr[i].value_len = len(value)
    return arr, len(spec), keep


def _rate(fn, nbytes, seconds, batches=10):
    """Run fn() repeatedly for about `seconds`; MB/s per batch."""
    fn()                                            # warm up, check it works
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    per_batch = max(1, int(seconds / batches / once))
    rates = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fn()
        dt = time.perf_counter() - t0
        rates.append(nbytes * per_batch / dt / 1e6)
    return {"best": max(rates), "median": statistics.median(rates),
            "us_per_body": nbytes / max(rates)}


def bench_json(seconds=1.0, bodies=None):
    """Measure scan / scan+plan / scan+apply MB/s; returns a dict
    ``{body: {"bytes": n, step: {"best", "median", "us_per_body"}}}``.

    ``seconds`` is spent per (body, step) pair.  Raises RuntimeError if the
    library rejects a body (it never should).
    """
    bodies = bodies or make_bodies()
    edits, n_edits, keep = _edits()
    cap = 64
    members = ffi.new("omni_json_member_t[]", cap)
    doc = ffi.new("omni_json_doc_t *")
    segs = ffi.new("omni_json_seg_t[]", 2 * cap + 6 * n_edits + 4)
    nseg = ffi.new("size_t *")
    out_len = ffi.new("size_t *")
    results = {}

    for name, body in bodies.items():
        buf = ffi.from_buffer("uint8_t[]", body)
        size = len(body)
        out_cap = size + 4096
        out = ffi.new("uint8_t[]", out_cap)
        u32 = ffi.new("uint32_t[]", size // 2 + 1)
        count = ffi.new("size_t *")
        scan = lib.omni_json_scan
        plan = lib.omni_json_plan
        apply_ = lib.omni_json_apply
        nsegs = 2 * cap + 6 * n_edits + 4

        def do_scan():
            rc = scan(buf, size, 0, members, cap, doc)
            if rc != 0:
                raise RuntimeError(f"{name}: scan rc {rc}")

        def do_plan():
            do_scan()
            rc = plan(buf, size, members, doc.n_members, edits, n_edits,
                      segs, nsegs, nseg, out_len, ffi.NULL, 0)
            if rc != 0:
                raise RuntimeError(f"{name}: plan rc {rc}")

        def do_apply():
            do_scan()
            rc = apply_(buf, size, members, doc.n_members, edits, n_edits,
                        out, out_cap, out_len)
            if rc != 0:
                raise RuntimeError(f"{name}: apply rc {rc}")

        steps = {"scan": do_scan, "scan_plan": do_plan, "scan_apply": do_apply}
        if name == "tokens":
            def do_u32():
                do_scan()
                i = lib.omni_json_find(buf, members, doc.n_members, b"prompt", 6)
                m = members[i]
                rc = lib.omni_json_u32_array(buf, m.val_off, m.val_len, u32,
                                             size // 2 + 1, count)
                if rc != 0:
                    raise RuntimeError(f"{name}: u32 rc {rc}")
            steps["scan_u32"] = do_u32

        entry = {"bytes": size}
        for step, fn in steps.items():
            entry[step] = _rate(fn, size, seconds)
        results[name] = entry

    del keep
    return results


def format_json_bench(results):
    """Human-readable lines for bench_json()'s result."""
    lines = []
    for name, entry in results.items():
        for step, r in entry.items():
            if step == "bytes":
                continue
            lines.append(f"json {name:<8} {entry['bytes']:>7} B  {step:<10} "
                         f"best {r['best']:8.0f} MB/s  median {r['median']:8.0f} MB/s  "
                         f"{r['us_per_body']:7.1f} us/body")
    return lines


if __name__ == "__main__":     # python -m omni_ctl.bench.lib_json [seconds]
    import sys
    for line in format_json_bench(bench_json(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)):
        print(line)
