"""omni_proxy.sh: the seed's command line, mapped onto omni-ctl."""

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port
from omni_ctl import nginxctl

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "omni_proxy.sh"


def seed_args(conf_file, model_path):
    """The seed README's example, with a writable config path."""
    return ["--nginx-conf-file", str(conf_file),
            "--start-core-index", "0",
            "--core-num", "4",
            "--listen-port", "8080",
            "--prefill-endpoints", "127.0.0.1:8001,127.0.0.1:8002",
            "--decode-endpoints", "127.0.0.1:9001,127.0.0.1:9002",
            "--omni-proxy-pd-policy", "sequential",
            "--omni-proxy-model-path", str(model_path)]


def environment(**extra):
    env = dict(os.environ)
    cli = Path(sys.executable).parent / "omni-ctl"
    if cli.is_file():
        env["OMNI_CTL"] = str(cli)
    env.update(extra)
    return env


def run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, env=environment(**env))


def omni_ctl(*args, **env):
    return subprocess.run([sys.executable, "-m", "omni_ctl.cli", *args], capture_output=True,
                          text=True, timeout=120, env=environment(**env))


def test_seed_example_renders_what_omni_ctl_renders(omni_module, tmp_path):
    conf_file = tmp_path / "conf" / "nginx.conf"
    res = run(*seed_args(conf_file, tmp_path), "--dry-run",
              OMNI_CPU_COUNT="8", PYTHONHASHSEED="123")
    assert res.returncode == 0, res.stderr
    from_script = conf_file.read_text()

    res = omni_ctl("gen-conf", "--nginx-conf-file", str(conf_file),
                   "--start-core-index", "0", "--core-num", "4", "--listen-port", "8080",
                   "--prefill-endpoints", "127.0.0.1:8001,127.0.0.1:8002",
                   "--decode-endpoints", "127.0.0.1:9001,127.0.0.1:9002",
                   "--pd-policy", "sequential", "--model-path", str(tmp_path),
                   OMNI_CPU_COUNT="8")
    assert res.returncode == 0, res.stderr
    assert conf_file.read_text() == from_script
    assert f"omni_model_path {tmp_path};" in from_script
    assert "worker_cpu_affinity 0001 0010 0100 1000;" in from_script


def test_every_gen_conf_option_maps_through_omni_proxy_prefix(omni_module, tmp_path):
    """--omni-proxy-X reaches gen-conf as --X for options the seed never had."""
    conf_file = tmp_path / "nginx.conf"
    res = run(*seed_args(conf_file, tmp_path), "--dry-run", "--omni-proxy-queue-max", "77",
              "--omni-proxy-engine-routes", "/get_model_info",
              "--omni-proxy-status-allow=10.0.0.0/8", OMNI_CPU_COUNT="8")
    assert res.returncode == 0, res.stderr
    text = conf_file.read_text()
    assert "omni_queue_max 77;" in text
    assert "location = /get_model_info {" in text and "location = /v1/models" not in text
    assert "allow 10.0.0.0/8;" in text
    res = run(*seed_args(conf_file, tmp_path), "--dry-run", "--omni-proxy-no-such", "1")
    assert res.returncode != 0 and "--no-such" in res.stderr


def test_seed_names_are_the_tables():
    """The options the script takes under their own names are those the
    option table marks as the seed's."""
    from omni_ctl import conf
    script = SCRIPT.read_text()
    case = script[script.index("# the seed's own names"):script.index("--omni-proxy-?*)")]
    names = set(re.findall(r"--[a-z-]+", case)) - {"--nginx-conf-file"}
    assert names == {o.flag for o in conf.OPTIONS if o.seed}


def test_pythonhashseed_changes_nothing(omni_module, tmp_path):
    texts = []
    for seed in ("123", "0", "random"):
        conf_file = tmp_path / seed / "nginx.conf"
        res = run(*seed_args(conf_file, tmp_path), "--dry-run", OMNI_CPU_COUNT="8",
                  PYTHONHASHSEED=seed)
        assert res.returncode == 0, res.stderr
        texts.append(conf_file.read_text().replace(str(conf_file.parent), "PREFIX"))
    assert texts[0] == texts[1] == texts[2]


def test_seed_example_dry_run_on_this_machine(omni_module, tmp_path):
    """A dry run renders for any machine: missing cores are a warning."""
    conf_file = tmp_path / "nginx.conf"
    res = run(*seed_args(conf_file, tmp_path), "--dry-run", OMNI_CPU_COUNT="2")
    assert res.returncode == 0, res.stderr
    assert "nginx -t: ok" in res.stderr
    assert "warning: workers are pinned to cores up to 3 but this machine has 2" in res.stderr
    assert not nginxctl.status(conf_file).running


@pytest.mark.parametrize("args, message, usage", [
    (["--frobnicate"], "unknown option '--frobnicate'", True),
    (["--listen-port"], "--listen-port needs a value", True),
    (["--dry-run", "--stop"], "--dry-run and --stop cannot be combined", False),
    (["--dry-run=yes"], "--dry-run takes no value", False),
    (["--stop", "--listen-port", "1"], "--stop takes only --nginx-conf-file", False),
])
def test_bad_command_lines(args, message, usage):
    res = run(*args)
    assert res.returncode != 0
    assert message in res.stderr.strip().splitlines()[-1]
    assert ("Usage: bash omni_proxy.sh" in res.stderr) == usage


def test_help():
    res = run("--help")
    assert res.returncode == 0 and "--omni-proxy-pd-policy" in res.stdout


def test_bad_value_is_reported_by_gen_conf(tmp_path):
    res = run(*seed_args(tmp_path / "nginx.conf", tmp_path), "--listen-port", "0",
              "--dry-run", OMNI_CPU_COUNT="8")
    assert res.returncode != 0 and "--listen-port '0'" in res.stderr
    assert list(tmp_path.iterdir()) == []


def status_roles(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/omni/status", timeout=10) as r:
        return [i["role"] for i in json.load(r)["instances"]]


def test_start_reload_rollback_stop(omni_module, tmp_path):
    conf_file = tmp_path / "nginx.conf"
    port = free_port()
    common = ["--nginx-conf-file", str(conf_file), "--listen-port", str(port),
              "--core-num", "1", "--prefill-endpoints", f"127.0.0.1:{free_port()}"]
    try:
        res = run(*common, "--decode-endpoints", f"127.0.0.1:{free_port()}",
                  "--log-file", str(tmp_path / "error.log"))
        assert res.returncode == 0, res.stderr
        assert status_roles(port) == ["prefill", "decode"]
        pid = nginxctl.status(conf_file).pid

        two = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
        res = run(*common, "--decode-endpoints", two, "--reload")
        assert res.returncode == 0, res.stderr
        assert status_roles(port) == ["prefill", "decode", "decode"]

        # running already: the default action re-renders and reloads
        res = run(*common, "--decode-endpoints", f"127.0.0.1:{free_port()}")
        assert res.returncode == 0, res.stderr
        assert "omni-ctl reload" in res.stderr
        assert status_roles(port) == ["prefill", "decode"]

        res = run("--nginx-conf-file", str(conf_file), "--rollback")
        assert res.returncode == 0, res.stderr
        assert status_roles(port) == ["prefill", "decode", "decode"]
        assert nginxctl.status(conf_file).pid == pid

        res = run("--nginx-conf-file", str(conf_file), "--stop")
        assert res.returncode == 0, res.stderr
        assert not nginxctl.status(conf_file).running
    finally:
        nginxctl.stop(conf_file)
    assert not nginxctl.bad_log_lines((tmp_path / "error.log").read_text())
