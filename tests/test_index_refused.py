"""A prompt the engine refuses leaves no marks in the prefix index.

The proxy marks a prompt's blocks as held on the instance it dispatches the
prefill to (approximate entries) before the engine answers.  When the engine
refuses it (here: a prompt longer than its context, 400), those marks are
withdrawn (omni_index_withdraw): left in place they predict hits that never
come and, with KV events, where an instance's index capacity is the engine's
own cache, push out blocks the engine still holds (issue 22's Mooncake run,
docs/benchmarks.md section 10).  Real nginx, a real `omni-ctl sim` pair.
"""


import pytest

from omni_ctl.sim.cluster import SimCluster

from conftest import wait_until, random_tokens as _tokens

pytestmark = pytest.mark.timeout(120)

BLOCK = 16


def _prefill(nginx):
    return next(i for i in nginx.status()["instances"] if i["role"] == "prefill")


def test_refused_prompt_leaves_no_marks(omni_nginx):
    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny",
                    args=["--max-model-len", "512"]) as sim:
        nginx = omni_nginx(prefill_endpoints=",".join(sim.prefill_endpoints),
                           decode_endpoints=",".join(sim.decode_endpoints),
                           pd_policy="sequential", block_size=BLOCK)
        # accepted: its blocks are marked (the control)
        ok = _tokens(BLOCK * 6, "ok")
        resp = nginx.post("/v1/completions", json={
            "model": "m", "prompt": ok, "max_tokens": 2}, timeout=60)
        assert resp.status == 200, resp.text
        assert _prefill(nginx)["cache"]["approx"] == 6
        # refused by the engine (longer than its context): no marks stay,
        # including for the part it shares with the accepted prompt's
        # (those were there before it and stay)
        long = ok + _tokens(BLOCK * 40, "long")
        resp = nginx.post("/v1/completions", json={
            "model": "m", "prompt": long, "max_tokens": 2}, timeout=60)
        assert resp.status == 400, resp.text
        wait_until(lambda: _prefill(nginx)["inflight_requests"] == 0,
                   timeout=30, what="the refused request's books closed")
        cache = _prefill(nginx)["cache"]
        assert cache["approx"] == 6 and cache["blocks"] == 6, cache
        # and the accepted prefix still steers: predicted on the next one
        resp = nginx.post("/v1/completions", json={
            "model": "m", "prompt": ok + _tokens(BLOCK, "tail"), "max_tokens": 2},
            timeout=60)
        assert resp.status == 200, resp.text
        assert _prefill(nginx)["cache_check"]["predicted"] >= BLOCK * 6
        assert _prefill(nginx)["cache_check"]["missing"] == 0
