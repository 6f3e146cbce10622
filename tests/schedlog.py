"""What the scheduler tests read back: the proxy's access log and the
simulator's record of when each request reached its prefill instance, keyed
by the id the client sent (the engines see the proxy's own ids)."""


def access(tmp_path):
    """client request id -> {field: value} from the proxy's access log."""
    out = {}
    path = tmp_path / "access.log"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        fields = dict(p.split("=", 1) for p in line.split() if "=" in p)
        if "id" in fields:
            # the engines see the proxy's own id; the client's is client_id
            key = fields.get("client_id", "-")
            out[key if key != "-" else fields["id"]] = fields
    return out


def prefill_records(sim, rids, tmp_path):
    """client request id -> its prefill instance's record of it (arrival,
    queue_s, ttft_s, ...: omni_ctl/sim/engine.py)."""
    # the engines saw the proxy's ids: back to the clients' through the log
    to_client = {f["id"]: k for k, f in access(tmp_path).items()}
    out = {}
    for inst in sim.stats(requests=500)["cluster"]:
        if inst["role"] not in ("prefill", "both"):
            continue
        for req in inst.get("requests", []):
            rid = to_client.get(req.get("x_request_id"), req.get("x_request_id"))
            if rid in rids:
                out[rid] = req
    return out


def prefill_starts(sim, rids, tmp_path):
    """client request id -> arrival time at its prefill instance (unix s)."""
    return {rid: req["arrival_unix"]
            for rid, req in prefill_records(sim, rids, tmp_path).items()}
