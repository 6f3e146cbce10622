"""The status token guards the KV-event ingestion location too.

With `--status-token` (or `--status-token-file`) the loopback-only
`/omni/ingest` requires `Authorization: Bearer TOKEN` like /omni/status and
/metrics; `omni-ctl agent` reads the token from the file the config names
(never from its command line). A batch without the token, or with a wrong
one, gets a 401 JSON error, is counted (`ingest.unauthorized`,
`omni_ingest_unauthorized_total`) and logged, and changes nothing. Real
nginx, real `omni-ctl sim` engines with their ZMQ publishers, the real agent.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omni_ctl.agent.batch import Batch
from omni_ctl.agent.cli import AgentOptionError, push_token
from omni_ctl.agent.config import ingest_key

from conftest import wait_until
from test_ingest_proxy import (BLOCK, _addrs, _agent, _cluster, _direct, _proxy,
                               _stop, _tokens)

pytestmark = pytest.mark.timeout(240)

TOKEN = "st-ingest-5a4b3c2d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BATCH_TYPE = {"Content-Type": "application/octet-stream"}


def _status(nginx):
    resp = nginx.get("/omni/status", headers=AUTH, timeout=10)
    assert resp.status == 200, resp.text[:200]
    return resp.json()


def _prefill(nginx):
    return {i["address"]: i for i in _status(nginx)["instances"]
            if i["role"] == "prefill"}


def _store_batch(addr, seed):
    """A valid batch: the instance precise and two blocks stored."""
    b = Batch(BLOCK)
    b.state(addr, "precise", "up")
    b.store(addr, BLOCK, [7001, 7002], _tokens(2 * BLOCK, seed))
    return b.encode()


def _cmdline(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_agent_started_by_start_sends_the_status_token(omni_nginx):
    """`omni-ctl start` runs the agent; it reads the token from the config's
    key file, and the engine's stores reach the index."""
    from omni_ctl import nginxctl
    from omni_ctl.agent import control as agentctl
    with _cluster() as sim:
        nginx = _proxy(omni_nginx, sim, kv_events_port_offset=100,
                       kv_replay_port_offset=200, status_token=TOKEN)
        assert nginx.get("/omni/status").status == 401
        svc = nginxctl.agent_service(nginxctl.read_conf(nginx.conf_path))
        pid = agentctl.running_pid(svc)
        assert pid is not None
        assert TOKEN not in _cmdline(pid)
        wait_until(lambda: all(i["agent"]["mode"] == "precise"
                               for i in _status(nginx)["instances"]),
                   timeout=30, what="every instance precise")
        addr = _addrs(sim)[0]
        url = dict(zip(_addrs(sim), sim.prefill_urls))[addr]
        base = _prefill(nginx)[addr]["agent"]["blocks_stored"]
        _direct(url, _tokens(BLOCK * 8, "start-token"))
        wait_until(lambda: _prefill(nginx)[addr]["agent"]["blocks_stored"] >= base + 8,
                   timeout=30, what="the engine's stores applied")
        st = _status(nginx)["ingest"]
        assert st["batches"] > 0 and st["rejected"] == 0
        assert st["unauthorized"] == 0
        nginx.stop()
        assert agentctl.running_pid(svc) is None


def test_without_the_token_a_batch_is_refused_and_changes_nothing(omni_nginx):
    nginx = omni_nginx(block_size=BLOCK, status_token=TOKEN)
    addr = next(iter(_prefill(nginx)))
    body = _store_batch(addr, "refused")
    before = _prefill(nginx)[addr]
    for headers in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}x"},
                    {"Authorization": f"Basic {TOKEN}"}):
        resp = nginx.request("POST", "/omni/ingest", body=body,
                             headers={**BATCH_TYPE, **headers})
        assert resp.status == 401, resp.text
        err = json.loads(resp.text)["error"]
        assert err["type"] == "authentication_error" and err["code"] == 401
        assert resp.headers["www-authenticate"].startswith("Bearer")
    # counted in the log phase, after each answer went out (another worker
    # may not have got there when the client asks)
    wait_until(lambda: _status(nginx)["ingest"]["unauthorized"] >= 3,
               timeout=10, what="the refusals counted")
    st = _status(nginx)
    assert st["ingest"]["unauthorized"] == 3
    assert st["ingest"]["batches"] == 0 and st["ingest"]["records"] == 0
    after = _prefill(nginx)[addr]
    assert after["agent"] == before["agent"]
    assert after["cache"] == before["cache"]
    metrics = nginx.get("/metrics", headers=AUTH).text
    assert "omni_ingest_unauthorized_total 3" in metrics
    wait_until(lambda: nginx.error_log.count("ingest batch refused") >= 3,
               timeout=10, what="the refusals logged")
    nginx.allow("ingest batch refused")
    # the same batch with the token is applied
    resp = nginx.request("POST", "/omni/ingest", body=body,
                         headers={**BATCH_TYPE, **AUTH})
    assert resp.status == 204, resp.text
    st = _status(nginx)
    assert st["ingest"]["batches"] == 1 and st["ingest"]["unauthorized"] == 3
    assert _prefill(nginx)[addr]["agent"]["mode"] == "precise"
    assert _prefill(nginx)[addr]["agent"]["blocks_stored"] == 2


def test_without_a_status_token_ingestion_needs_none(omni_nginx):
    nginx = omni_nginx(block_size=BLOCK)
    assert ingest_key(nginx.conf_path.read_text()) is None
    addr = next(iter(_prefill(nginx)))
    resp = nginx.request("POST", "/omni/ingest", body=_store_batch(addr, "open"),
                         headers=BATCH_TYPE)
    assert resp.status == 204, resp.text
    assert _status(nginx)["ingest"]["batches"] == 1
    assert _status(nginx)["ingest"]["unauthorized"] == 0


def test_agent_with_a_wrong_token_file_is_refused(omni_nginx, tmp_path):
    """--push-token-file overrides the config's key: a wrong one gets 401s,
    counted by nginx; the agent says why in its log."""
    with _cluster() as sim:
        nginx = _proxy(omni_nginx, sim, status_token=TOKEN)
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token\n")
        agent = _agent(nginx, "--push-token-file", str(wrong))
        try:
            wait_until(lambda: _status(nginx)["ingest"]["unauthorized"] > 0,
                       timeout=30, what="a refused batch")
            assert _status(nginx)["ingest"]["batches"] == 0
            assert all(i["agent"]["mode"] != "precise"
                       for i in _status(nginx)["instances"])
        finally:
            _stop(agent)
        log = (nginx.prefix / "agent.log").read_text()
        assert "refused the batch (401)" in log and "token is wrong" in log
        nginx.allow("ingest batch refused")


def test_ingest_key_is_the_nearest_one(tmp_path):
    conf = """
    http {
        omni_api_key_file outer;
        server {
            location = /omni/status { omni_api_key_file st; omni_status; }
            location = /omni/ingest { allow 127.0.0.1; %s omni_ingest; }
        }
    }"""
    assert ingest_key(conf % "") == ("file", "outer")
    assert ingest_key(conf % 'omni_api_key_file "inner key";') == ("file", "inner key")
    assert ingest_key(conf % "omni_api_key k-1;") == ("key", "k-1")
    assert ingest_key(conf % "omni_api_key off;") is None
    assert ingest_key("http { server { location = /x { omni_ingest; } } }") is None
    # a relative key file is the config directory's, as nginx reads it
    (tmp_path / "outer").write_text("tok-1\r\n")
    conf_file = tmp_path / "nginx.conf"
    assert push_token(None, conf_file, conf % "") == "tok-1"
    (tmp_path / "mine").write_text("tok-2\n")
    assert push_token(tmp_path / "mine", conf_file, conf % "") == "tok-2"
    assert push_token(None, None, None) is None
    (tmp_path / "bad").write_text("two words\n")
    for path in (tmp_path / "bad", tmp_path / "missing"):
        with pytest.raises(AgentOptionError):
            push_token(path, conf_file, conf % "")


def test_agent_cli_rejects_an_unreadable_token_file(tmp_path):
    conf = tmp_path / "nginx.conf"
    conf.write_text("http { upstream p { omni_balance prefill; server 127.0.0.1:9; }"
                    " server { location = /omni/ingest { omni_api_key_file nope;"
                    " omni_ingest; } } }")
    r = subprocess.run([str(Path(sys.executable).parent / "omni-ctl"), "agent",
                        "--conf", str(conf), "--push", "http://127.0.0.1:9/omni/ingest",
                        "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "cannot read" in r.stderr and "nope" in r.stderr
