"""Golden files: rendered configs for fixed inputs, compared byte for byte.

The inputs pin everything that depends on the machine (module dir, core
count, paths), so the files are the same everywhere.  After an intended
change to the template, regenerate them and review the diff:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_conf_golden.py
"""

import dataclasses
import os
from pathlib import Path

import pytest

from omni_ctl import conf

GOLDEN = Path(__file__).parent / "golden"

CASES = {
    # the seed's README example
    "sequential": dict(
        prefill_endpoints="127.0.0.1:8001,127.0.0.1:8002",
        decode_endpoints="127.0.0.1:9001,127.0.0.1:9002",
        core_num=4, start_core_index=0, listen_port=8080, pd_policy="sequential",
        model_path="/models/DeepSeek"),
    "parallel": dict(
        prefill_endpoints="10.0.0.1:30000@8998,10.0.0.2:30000@8999,[fd00::3]:30000",
        decode_endpoints="10.0.0.4:30001,[fd00::5]:30001",
        core_num=2, start_core_index=6, listen_port=7150, pd_policy="parallel",
        schedule_policy="cache-aware", prefill_queue_order="fcfs",
        max_batch_num_token=32768, prefill_max_num_seqs=8, decode_max_num_seqs=128,
        prefill_starvation_timeout="1500"),
    "aggregated": dict(
        decode_endpoints="engine-0.local:8000,engine-1.local:8000",
        pd_policy="aggregated", listen_host="0.0.0.0", listen_port=80, core_num=1,
        schedule_policy="least-loaded", access_log_file="off", log_level="info",
        log_file="/var/log/omni/error.log", user="www-data", worker_connections=16384,
        zone_size="256m", prefill_read_timeout="120s", decode_read_timeout="1h",
        connect_timeout="3s", keepalive=64, max_body_size="16m", max_fails=0,
        fail_timeout="5s", queue_max=100, queue_timeout="30s"),
}


def render_case(name: str, tmp_path) -> str:
    options = dict(CASES[name])
    model_path = options.pop("model_path", None)
    if model_path:
        options["model_path"] = str(tmp_path)      # must exist to validate
    c = conf.make_conf("/srv/omni/nginx.conf", module_dir="/opt/omni-proxy/modules",
                       **options)
    if model_path:
        c = dataclasses.replace(c, model_path=Path(model_path))
    return conf.render_conf(c)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_CPU_COUNT", "8")
    text = render_case(name, tmp_path)
    path = GOLDEN / f"{name}.conf"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (
        f"rendered config differs from {path}; if the change is intended, "
        "regenerate with UPDATE_GOLDEN=1 and review the diff")
