"""docs/configuration.md's option tables are what the option table
generates (`python -m omni_ctl.conf_cli --write docs/configuration.md`)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from omni_ctl import conf, conf_cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_committed_doc_matches_the_generator():
    text = DOC.read_text()
    assert text.count(conf_cli.DOC_BEGIN) == 1 and text.count(conf_cli.DOC_END) == 1
    assert conf_cli.replace_doc_tables(text) == text, (
        "docs/configuration.md's option tables are stale: run "
        "`.venv/bin/python -m omni_ctl.conf_cli --write docs/configuration.md`")


def test_every_option_has_a_row_with_its_default():
    tables = conf_cli.doc_tables()
    for opt in conf.OPTIONS:
        rows = [line for line in tables.splitlines()
                if re.match(rf"\| `{opt.flag}[ `]", line)]
        assert len(rows) == 1, opt.flag
        if opt.directive:
            assert f"`{opt.directive}`" in rows[0]
        if opt.shown_default not in (None, "none"):
            assert f"`{opt.shown_default}`" in rows[0]


def test_generator_prints_and_writes(tmp_path):
    res = subprocess.run([sys.executable, "-m", "omni_ctl.conf_cli"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == conf_cli.doc_tables()
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{conf_cli.DOC_BEGIN}\nstale\n{conf_cli.DOC_END}\noutro\n")
    res = CliRunner().invoke(conf_cli.doc_main, ["--write", str(page)])
    assert res.exit_code == 0, res.output
    assert page.read_text() == (f"intro\n{conf_cli.DOC_BEGIN}\n{conf_cli.doc_tables()}"
                                f"{conf_cli.DOC_END}\noutro\n")
    page.write_text("no markers\n")
    res = CliRunner().invoke(conf_cli.doc_main, ["--write", str(page)])
    assert res.exit_code != 0 and "markers" in res.output


def test_a_changed_default_shows_as_stale(monkeypatch):
    """The comparison can fail: a default changed in the table makes the
    committed page differ."""
    opt = conf.OPTION["queue_max"]
    monkeypatch.setattr(conf, "OPTIONS", tuple(
        o if o is not opt else conf.Option(**{**opt.__dict__, "default": 17})
        for o in conf.OPTIONS))
    text = DOC.read_text()
    assert conf_cli.replace_doc_tables(text) != text
    assert re.search(r"`--queue-max N` \| `17`", conf_cli.doc_tables())
