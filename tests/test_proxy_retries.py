"""A failed leg is retried on another instance before the client saw a
byte, within --max-retries, and the failure counts against the instance.

A real nginx with our module in front of the simulated cluster (2 prefill +
2 decode, vLLM protocol, sequential P/D); the simulator's fault injection
(`POST /sim/fault`) makes one instance misbehave, or an endpoint nobody
listens on refuses connections.
"""

import socket

import pytest

from omni_ctl.sim.cluster import SimCluster
from test_proxy_errors import _error, _idle

pytestmark = pytest.mark.timeout(180)

BODY = {"prompt": "retry me", "max_tokens": 2}


@pytest.fixture(scope="module")
def sim():
    with SimCluster(prefill=2, decode=2, engine="vllm", preset="tiny",
                    args=["--speedup", "0.2"]) as cluster:
        yield cluster


@pytest.fixture
def clean_sim(sim):
    yield sim
    sim.fault(sim.urls[0], mode="none", instance="all")


def _dead_endpoint():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def _proxy(omni_nginx, sim, **options):
    options.setdefault("prefill_endpoints", ",".join(sim.prefill_endpoints))
    options.setdefault("decode_endpoints", ",".join(sim.decode_endpoints))
    options.setdefault("schedule_policy", "least-loaded")
    # never rest an instance: every request may be placed on the bad one
    options.setdefault("max_fails", 0)
    return omni_nginx(**options)


def _errors(sim, urls):
    return sum(sim.stats(u)["instance"]["errors_total"] for u in urls)


def _inst(status, addr):
    return next(i for i in status["instances"] if i["address"] == addr)


@pytest.mark.parametrize("tier", ["prefill", "decode"])
def test_5xx_leg_is_retried_on_another_instance(omni_nginx, clean_sim, tier):
    nginx = _proxy(omni_nginx, clean_sim)
    urls = clean_sim.prefill_urls if tier == "prefill" else clean_sim.decode_urls
    clean_sim.fault(urls[0], mode="error", status=500)
    before = _errors(clean_sim, urls[:1])
    for i in range(6):
        resp = nginx.post("/v1/completions", json=BODY)
        assert resp.status == 200, (i, resp.status, resp.text)
        assert resp.json()["choices"][0]["text"] is not None
    # the bad instance was tried (and failed) at least once: a retry did it
    bad = _errors(clean_sim, urls[:1]) - before
    assert bad >= 1
    status = _idle(nginx)
    eps = clean_sim.prefill_endpoints if tier == "prefill" else clean_sim.decode_endpoints
    inst = _inst(status, eps[0].split("@")[0])
    # passive health: the 5xx answers counted against it
    assert inst["errors_total"] >= bad and inst["fails"] >= 1, inst


def test_refused_prefill_is_retried_on_another(omni_nginx, clean_sim):
    dead = _dead_endpoint()
    nginx = _proxy(omni_nginx, clean_sim,
                   prefill_endpoints=f"{dead},{clean_sim.prefill_endpoints[0]}")
    nginx.allow(r"connect\(\) failed")
    for i in range(6):
        resp = nginx.post("/v1/completions", json=BODY)
        assert resp.status == 200, (i, resp.status, resp.text)
    status = _idle(nginx)
    inst = _inst(status, dead)
    assert inst["errors_total"] >= 1 and inst["fails"] >= 1, inst


@pytest.mark.parametrize("max_retries", [0, 1])
@pytest.mark.parametrize("stream", [False, True])
def test_retries_stop_at_the_bound(omni_nginx, clean_sim, max_retries, stream):
    """Every prefill instance fails: max_retries + 1 tries, then one
    well-formed 502 naming the tier."""
    nginx = _proxy(omni_nginx, clean_sim, max_retries=max_retries)
    for url in clean_sim.prefill_urls:
        clean_sim.fault(url, mode="error", status=500)
    before = _errors(clean_sim, clean_sim.prefill_urls)
    before_d = _errors(clean_sim, clean_sim.decode_urls)
    resp = nginx.post("/v1/completions", json=dict(BODY, stream=stream))
    err = _error(resp, 502, "server_error")
    assert "prefill" in err["message"]
    assert _errors(clean_sim, clean_sim.prefill_urls) - before == max_retries + 1
    assert _errors(clean_sim, clean_sim.decode_urls) == before_d
    status = _idle(nginx)
    assert sum(i["fails"] for i in status["instances"]
               if i["role"] == "prefill") == max_retries + 1


@pytest.mark.parametrize("kinds, counted", [("error,timeout,5xx", True),
                                            ("error,timeout", False)])
def test_passive_health_on_says_which_failures_count(omni_nginx, clean_sim, kinds,
                                                     counted):
    """A 5xx answer counts against the instance (and, at --max-fails, rests
    it) unless --passive-health-on leaves 5xx out; the retry happens either
    way."""
    nginx = _proxy(omni_nginx, clean_sim, passive_health_on=kinds, max_fails=100)
    assert nginx.status()["config"]["passive_health_on"] == kinds
    clean_sim.fault(clean_sim.prefill_urls[0], mode="error", status=500)
    before = _errors(clean_sim, clean_sim.prefill_urls[:1])
    for _ in range(4):
        assert nginx.post("/v1/completions", json=BODY).status == 200
    assert _errors(clean_sim, clean_sim.prefill_urls[:1]) > before
    inst = _inst(_idle(nginx), clean_sim.prefill_endpoints[0].split("@")[0])
    assert (inst["fails"] > 0) == counted, inst
