"""The Python package of the scoring library (omni_ctl/scoring/): its API,
its place in the tree, and the instruments that must not import it."""

import json
import pkgutil
import subprocess
import sys

from click.testing import CliRunner

import omni_ctl
import omni_ctl.scoring as scoring
from omni_ctl.cli import main as cli


def test_the_package_exports_the_binding_and_json_api():
    from omni_ctl.scoring import binding, errors, jsonscan
    assert set(binding.__all__) <= set(dir(scoring))
    assert set(jsonscan.__all__) <= set(scoring.__all__)
    for name in ("ffi", "lib", "PrefixIndex", "Predictor", "block_hashes",
                 "decide_prefill", "queue_pick", "json_edit", "json_scan"):
        assert getattr(scoring, name) is getattr(binding, name), name
    assert scoring.lib is scoring._scoring.lib
    # library codes still become the exceptions of omni_ctl.scoring.errors
    try:
        scoring.block_hashes([1, 2, 3], 0)
    except errors.InvalidArgumentError as exc:
        assert isinstance(exc, ValueError)
    else:
        raise AssertionError("block size 0 accepted")


def _instrument_modules():
    out = []
    for pkg in ("omni_ctl.sim", "omni_ctl.bench"):
        mod = __import__(pkg, fromlist=["_"])
        for info in pkgutil.iter_modules(mod.__path__):
            out.append(f"{pkg}.{info.name}")
    return out


def test_simulator_and_bench_do_not_import_the_scoring_library():
    """Instruments measure the proxy from outside: importing every module of
    omni_ctl.sim and omni_ctl.bench (and the CLI) loads no part of
    omni_ctl.scoring, except bench-lib's modules, which measure it."""
    exempt = {"omni_ctl.bench.lib", "omni_ctl.bench.lib_json"}
    mods = [m for m in _instrument_modules() if m not in exempt]
    assert "omni_ctl.sim.cluster" in mods and "omni_ctl.bench.core" in mods
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods + ['omni_ctl.cli']!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules"
        " if m.startswith('omni_ctl.scoring'))))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []

    # and the exempt ones do import it (the check above can see an import)
    code = ("import sys, omni_ctl.bench.lib\n"
            "print('omni_ctl.scoring._scoring' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "True"


def test_no_flat_scoring_modules_left():
    names = {m.name for m in pkgutil.iter_modules(omni_ctl.__path__)}
    assert "scoring" in names
    assert not {n for n in names if n.startswith("scoring_")
                or n in ("_scoring", "_build_scoring", "cdefs")}, names


def test_bench_lib_command_is_wired():
    res = CliRunner().invoke(cli, ["bench-lib", "--help"])
    assert res.exit_code == 0, res.output
    assert "--quick" in res.output
