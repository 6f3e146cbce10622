"""The load ledger: every way a leg can end gives back all it was charged.

A real nginx with our module in front of the simulated cluster (`omni-ctl
sim`, real HTTP on loopback) in each P/D mode.  Each case ends legs one way
(success, engine 5xx, refused connection with a retry to another instance,
timeout with a retry, parallel-mode cancel, client abort before and after the
first byte) and then checks /omni/status: per instance nothing in flight
(requests, tokens), no predictor job (prefills in flight), no pending
predicted work, `prefilling` 0; no request in flight or waiting in a queue.

The simulator's fault injection (`POST /sim/fault`) makes instances fail or
hang; an endpoint nobody listens on refuses connections.
"""

import http.client
import json
import socket
import threading
import time

import pytest

from omni_ctl.sim.cluster import SimCluster

pytestmark = pytest.mark.timeout(240)

MODES = {
    # mode: (simulator engine, prefill instances, decode instances, both)
    "sequential": ("vllm", 2, 2, 0),
    "parallel": ("sglang", 2, 2, 0),
    "aggregated": ("vllm", 0, 0, 2),
}


@pytest.fixture(scope="module", params=list(MODES))
def cluster(request):
    mode = request.param
    engine, p, d, both = MODES[mode]
    with SimCluster(prefill=p, decode=d, both=both, engine=engine,
                    preset="tiny", args=["--speedup", "0.2"]) as sim:
        yield mode, sim


@pytest.fixture
def sim(cluster):
    """The cluster, its faults cleared after the test."""
    mode, sim = cluster
    yield mode, sim
    for url in sim.urls:
        try:
            sim.fault(url, mode="none", instance="all")
            break
        except OSError:
            continue


def dead_endpoint():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def start_proxy(omni_nginx, mode, sim, prefill=None, decode=None, **options):
    options.setdefault("schedule_policy", "omni")
    options["pd_policy"] = mode
    options["decode_endpoints"] = ",".join(decode or sim.decode_endpoints)
    if mode != "aggregated":
        options["prefill_endpoints"] = ",".join(prefill or sim.prefill_endpoints)
    nginx = omni_nginx(**options)
    nginx.allow(r"connect\(\) failed")
    return nginx


def leftovers(status):
    """What /omni/status still shows in flight, [] when nothing."""
    left = []
    for i in status["instances"]:
        held = {
            "inflight_requests": i["inflight_requests"],
            "inflight_tokens": i["inflight_tokens"],
            "prefilling": i["prefilling"],
            "prefilling_tokens": i.get("prefilling_tokens", 0),
            "predictor_jobs": i["predictor"]["prefills_in_flight"],
            "pending_ms": i["predictor"]["predicted_free_in_ms"],
        }
        held = {k: v for k, v in held.items() if v}
        if held:
            left.append((i["role"], i["address"], held))
    totals = status["totals"]["inflight_requests"]
    if totals:
        left.append(("totals", "inflight_requests", totals))
    q = status["queues"]
    if q["prefill_waiting"] or q["decode_waiting"]:
        left.append(("queues", q["prefill_waiting"], q["decode_waiting"]))
    return left


def assert_all_given_back(nginx, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        status = nginx.status()
        left = leftovers(status)
        if not left:
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"still charged after {timeout:g}s: {left}")
        time.sleep(0.05)


def body(stream=False, max_tokens=4, **extra):
    return {"prompt": "the ledger " * 20, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream, **extra}


def post(nginx, payload, timeout=60):
    conn = http.client.HTTPConnection(nginx.host, nginx.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(payload),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def assert_failed(status, data, code=502):
    """One well-formed failure: a JSON error, or (a stream whose header
    already went out, e.g. parallel mode's decode before its prefill
    failed) a last SSE event that is the error."""
    if status == 200:
        last = [e for e in data.split(b"\n\n") if e][-1]
        assert last.startswith(b"data: "), data
        assert json.loads(last[6:])["error"]["code"] == code, data
    else:
        assert status == code, data
        assert json.loads(data)["error"]["code"] == code, data


def send_raw(nginx, payload):
    sock = socket.create_connection((nginx.host, nginx.port))
    data = json.dumps(payload).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def wait_charged(nginx, role, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not any(i["role"] == role and i["inflight_requests"]
                  for i in nginx.status()["instances"]):
        assert time.monotonic() < deadline, f"no {role} leg started"
        time.sleep(0.05)


@pytest.mark.parametrize("policy", ["omni", "least-loaded"])
def test_success(omni_nginx, sim, policy):
    mode, cl = sim
    nginx = start_proxy(omni_nginx, mode, cl, schedule_policy=policy)
    for stream in (False, True):
        for _ in range(3):
            status, data = post(nginx, body(stream=stream))
            assert status == 200, data
    status = assert_all_given_back(nginx)
    # the predictor learned from the prefills that succeeded
    assert any(i["predictor"]["prefill_samples"] for i in status["instances"])


@pytest.mark.parametrize("tier", ["prefill", "decode"])
def test_engine_5xx(omni_nginx, sim, tier):
    mode, cl = sim
    if mode == "aggregated" and tier == "prefill":
        pytest.skip("aggregated mode has no prefill tier")
    nginx = start_proxy(omni_nginx, mode, cl)
    urls = cl.prefill_urls if tier == "prefill" else cl.decode_urls
    for url in urls:
        cl.fault(url, mode="error", status=500)
    for stream in (False, True):
        status, data = post(nginx, body(stream=stream))
        assert_failed(status, data)
    assert_all_given_back(nginx)


def test_refused_connection_retries_elsewhere(omni_nginx, sim):
    """One instance of the retried tier refuses connections: legs sent there
    are retried on the other one, which is charged instead (predictor job
    and prefilling move with the leg)."""
    mode, cl = sim
    dead = dead_endpoint()
    # parallel mode tells the decode leg the prefill's address: only the
    # decode leg may go elsewhere
    tier = "decode" if mode in ("parallel", "aggregated") else "prefill"
    live = cl.decode_endpoints if tier == "decode" else cl.prefill_endpoints
    endpoints = [dead, live[0]]
    kw = {tier: endpoints}
    nginx = start_proxy(omni_nginx, mode, cl, schedule_policy="round-robin",
                        max_fails=0, **kw)
    for _ in range(4):
        status, data = post(nginx, body())
        assert status == 200, data
    assert_all_given_back(nginx)


def test_timeout_retries_elsewhere(omni_nginx, sim):
    mode, cl = sim
    tier = "decode" if mode in ("parallel", "aggregated") else "prefill"
    urls = cl.decode_urls if tier == "decode" else cl.prefill_urls
    nginx = start_proxy(omni_nginx, mode, cl, schedule_policy="round-robin",
                        prefill_read_timeout="2s", decode_read_timeout="2s",
                        max_fails=0)
    cl.fault(urls[0], mode="hang")
    for _ in range(2):
        status, data = post(nginx, body())
        # the hung try timed out and the request went on elsewhere, or (a
        # parallel pair bound to the hung prefill) failed as a whole
        assert status in (200, 502, 504), data
    assert_all_given_back(nginx)


def test_timeout_everywhere(omni_nginx, sim):
    mode, cl = sim
    nginx = start_proxy(omni_nginx, mode, cl, prefill_read_timeout="2s",
                        decode_read_timeout="2s")
    urls = cl.decode_urls if mode == "aggregated" else cl.prefill_urls
    for url in urls:
        cl.fault(url, mode="hang")
    status, data = post(nginx, body())
    assert status == 504, data
    assert_all_given_back(nginx)


def test_parallel_cancel(omni_nginx, sim):
    """Parallel mode: the decode leg fails while the prefill leg still runs;
    the prefill leg is cancelled (finalized with no post-subrequest
    handler): its charge and predictor job are given back all the same."""
    mode, cl = sim
    if mode != "parallel":
        pytest.skip("cancel is parallel mode's")
    nginx = start_proxy(omni_nginx, mode, cl)
    for url in cl.prefill_urls:
        cl.fault(url, mode="hang")
    for url in cl.decode_urls:
        cl.fault(url, mode="error", status=500)
    for _ in range(3):
        status, data = post(nginx, body())
        assert_failed(status, data)
    assert_all_given_back(nginx)


@pytest.mark.parametrize("when", ["before_first_byte", "after_first_byte"])
def test_client_abort(omni_nginx, sim, when):
    mode, cl = sim
    nginx = start_proxy(omni_nginx, mode, cl)
    if when == "before_first_byte":
        # the first leg hangs: the client goes away while it runs
        urls = cl.decode_urls if mode == "aggregated" else cl.prefill_urls
        for url in urls:
            cl.fault(url, mode="hang")
        if mode == "parallel":
            for url in cl.decode_urls:
                cl.fault(url, mode="hang")
    socks = []
    for _ in range(3):
        sock = send_raw(nginx, body(stream=True, max_tokens=400))
        if when == "after_first_byte":
            sock.settimeout(30)
            assert sock.recv(65536)
        socks.append(sock)
    if when == "before_first_byte":
        wait_charged(nginx, "decode" if mode == "aggregated" else "prefill")
    for sock in socks:
        sock.close()
    assert_all_given_back(nginx)
    # and the instances are worth as much as before: new requests go through
    for url in cl.urls:
        try:
            cl.fault(url, mode="none", instance="all")
            break
        except OSError:
            continue
    status, data = post(nginx, body())
    assert status == 200, data
    assert_all_given_back(nginx)


# -- a worker that dies


def _held_and_in_flight(nginx, clients, held):
    """Start `clients` clients (threads appending to the returned results)
    and wait until at least `held` requests are queued and one leg runs."""
    results = []
    threads = [threading.Thread(target=_client, args=(nginx, results, i % 2 == 0))
               for i in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while True:
        st = nginx.status()
        queued = st["queues"]["prefill_waiting"] + st["queues"]["decode_waiting"]
        inflight = sum(i["inflight_requests"] for i in st["instances"])
        if queued >= held and inflight >= 1:
            return results, threads
        assert time.monotonic() < deadline, st["queues"]
        time.sleep(0.02)


def _client(nginx, results, stream):
    """One request; records (status, complete-and-well-formed) or the
    connection closing."""
    payload = body(stream=stream, max_tokens=30)
    try:
        conn = http.client.HTTPConnection(nginx.host, nginx.port, timeout=120)
        conn.request("POST", "/v1/completions", body=json.dumps(payload),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        results.append(("closed", type(exc).__name__))
        return
    if resp.status != 200:
        err = json.loads(data)["error"]
        assert err["code"] == resp.status, data
        results.append((resp.status, "error"))
    elif stream:
        events = [e for e in data.split(b"\n\n") if e]
        assert all(e.startswith(b"data: ") for e in events), data
        last = events[-1][6:]
        assert last == b"[DONE]" or "error" in json.loads(last), data
        results.append((200, "stream"))
    else:
        assert json.loads(data)["usage"]["completion_tokens"] == 30, data
        results.append((200, "json"))


def allow_kill(nginx) -> None:
    """The alerts of a worker the test kills: its death, and, when it held
    the zone's lock at that moment, the master taking the lock back (the
    tests check the zone whole afterwards)."""
    nginx.allow(r"exited on signal 9")
    nginx.allow(r'shared memory zone "omni_proxy" was locked by')


def test_worker_killed_with_requests_in_flight_and_held(omni_nginx):
    """kill -9 of a worker while it has legs in flight and requests held:
    the process that starts next (the respawned worker) gives back its
    charges, predictor jobs, prefilling and requests; every client gets one
    well-formed answer or a closed connection; no entry stays queued."""
    import os
    import signal

    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny",
                    args=["--speedup", "0.05"]) as cl:
        # one worker: everything in flight and held is the killed one's; the
        # master respawns it and the new process finds what it left
        nginx = start_proxy(omni_nginx, "sequential", cl, core_num=1,
                            prefill_max_num_seqs=1)
        allow_kill(nginx)
        workers = nginx.workers
        assert len(workers) == 1, workers
        results, threads = _held_and_in_flight(nginx, 16, held=4)
        os.kill(workers[0], signal.SIGKILL)
        for t in threads:
            t.join(180)
            assert not t.is_alive()
        assert len(results) == 16, results
        assert any(r[0] == "closed" for r in results), results
        st = assert_all_given_back(nginx, timeout=30)
        assert st["totals"]["charges_reaped"] >= 1, st["totals"]
        # the zone is whole: a burst after it is served
        for _ in range(3):
            status, data = post(nginx, body())
            assert status == 200, data
        assert_all_given_back(nginx)


def test_old_worker_killed_after_a_reload(omni_nginx):
    """A reload, then `kill -9` of the old worker while it still finishes
    its requests (legs in flight, requests held).  The master respawns no
    worker for an old one, so no process start comes to give back what it
    held (the chaos run's leak: charges left on four instances); the
    workers' reaper does, within seconds, and the zone is whole after."""
    import os
    import signal

    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny",
                    args=["--speedup", "0.05"]) as cl:
        nginx = start_proxy(omni_nginx, "sequential", cl, core_num=1,
                            prefill_max_num_seqs=1)
        allow_kill(nginx)
        old = nginx.workers
        assert len(old) == 1, old
        results, threads = _held_and_in_flight(nginx, 8, held=2)
        nginx.reload()
        new = [w for w in nginx.workers if w not in old]
        assert new, "no new worker after the reload"
        # the old worker is still finishing its requests: killed now
        os.kill(old[0], 0)
        os.kill(old[0], signal.SIGKILL)
        for t in threads:
            t.join(180)
            assert not t.is_alive()
        assert len(results) == 8, results
        assert any(r[0] == "closed" for r in results), results
        st = assert_all_given_back(nginx, timeout=20)
        assert st["totals"]["charges_reaped"] >= 1, st["totals"]
        # no process started after the kill: the new worker gave it back
        assert set(nginx.workers) == set(new), (nginx.workers, new)
        for _ in range(3):
            status, data = post(nginx, body())
            assert status == 200, data
        assert_all_given_back(nginx)


def test_aborted_prefills_leave_no_phantom_work(omni_nginx, sim):
    """Issue 23's lead, the mechanism as state: prefill legs that end by a
    client abort must finish their predictor jobs.  If they do not, the
    instance keeps them in flight for ever, and every later completion
    re-anchors its predicted free time on their predicted work
    (free_at = done + pending): each new request is predicted to queue
    behind work that does not exist, and holding waits for it.  After the
    aborts and one request served, nothing may be predicted pending."""
    mode, cl = sim
    nginx = start_proxy(omni_nginx, mode, cl)
    urls = cl.decode_urls if mode == "aggregated" else cl.prefill_urls
    for url in urls:
        cl.fault(url, mode="hang")
    socks = [send_raw(nginx, body(stream=True, max_tokens=50)) for _ in range(4)]
    wait_charged(nginx, "decode" if mode == "aggregated" else "prefill")
    for sock in socks:
        sock.close()
    # the clients are gone: their legs' load is released (the upstreams'
    # cleanup), whatever happens to the predictor
    deadline = time.monotonic() + 15
    while any(i["inflight_requests"] for i in nginx.status()["instances"]):
        assert time.monotonic() < deadline, nginx.status()["instances"]
        time.sleep(0.05)
    for url in cl.urls:
        try:
            cl.fault(url, mode="none", instance="all")
            break
        except OSError:
            continue
    status, data = post(nginx, body())
    assert status == 200, data
    # (a parallel-mode prefill leg may end just after the client's answer:
    # polled, with a deadline a phantom job never meets)
    deadline = time.monotonic() + 15
    while True:
        phantom = [(i["address"], i["predictor"]["prefills_in_flight"],
                    i["predictor"]["predicted_free_in_ms"])
                   for i in nginx.status()["instances"]
                   if i["predictor"]["prefills_in_flight"]
                   or i["predictor"]["predicted_free_in_ms"]]
        if not phantom:
            break
        assert time.monotonic() < deadline, f"phantom predicted work: {phantom}"
        time.sleep(0.05)
