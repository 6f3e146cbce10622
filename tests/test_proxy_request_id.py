"""The request id the engines see is always the proxy's own.

Two clients sending one X-Request-Id must not collide inside the engines
and KV connectors, which key requests and transfers on it: each leg carries
an id the proxy generated; the client's id (sanitised: a capped run of
[A-Za-z0-9._:-]) comes back in the answer's X-Request-Id header and goes to
the access log ($omni_client_request_id).  Real nginx + the simulator (1
prefill + 1 decode, vLLM protocol, sequential P/D), whose /sim/stats records
each request's X-Request-Id.
"""

import pytest

from omni_ctl.sim.cluster import SimCluster
from test_proxy_errors import _idle

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sim():
    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny",
                    args=["--speedup", "0.2"]) as cluster:
        yield cluster


def _seen(sim, url, n):
    return [r["x_request_id"] for r in sim.stats(url, requests=n)["instance"]["requests"]]


def test_same_client_id_reaches_the_engines_as_different_ids(omni_nginx, sim):
    nginx = omni_nginx(prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=",".join(sim.decode_endpoints))
    answers = []
    for _ in range(2):
        resp = nginx.post("/v1/completions", json={"prompt": "same id", "max_tokens": 2},
                          headers={"X-Request-Id": "client-42"})
        assert resp.status == 200, resp.text
        answers.append(resp)
    # the client's id echoed, the engines' id told apart
    assert [r.headers["x-request-id"] for r in answers] == ["client-42"] * 2
    ours = [r.headers["x-omni-request-id"] for r in answers]
    assert ours[0] != ours[1] and "client-42" not in ours
    for url in (sim.prefill_urls[0], sim.decode_urls[0]):
        seen = _seen(sim, url, 2)
        assert "client-42" not in seen, seen
        assert sorted(seen) == sorted(ours), (seen, ours)
    _idle(nginx)


def test_client_id_is_sanitised(omni_nginx, sim):
    nginx = omni_nginx(prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=",".join(sim.decode_endpoints))
    resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                      headers={"X-Request-Id": "a\"b<c>" + "d" * 200})
    assert resp.status == 200, resp.text
    echoed = resp.headers["x-request-id"]
    assert echoed == ("abc" + "d" * 200)[:64]
    _idle(nginx)
