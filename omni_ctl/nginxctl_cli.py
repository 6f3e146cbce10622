"""`omni-ctl start | stop | reload | status`: thin click commands over
omni_ctl.nginxctl."""

from __future__ import annotations

import json

import click

from . import conf, nginxctl
from .conf_cli import conf_options, given_options

_conf_file = click.option("--nginx-conf-file", required=True, metavar="PATH",
                          help="The config whose nginx is managed.")


def _describe(st: nginxctl.Status) -> str:
    workers = " ".join(map(str, st.workers)) or "none"
    listen = ", ".join(st.listens) or "?"
    tok = f"; tokenizer pid {st.tokenizer}" if st.tokenizer else ""
    return (f"running: pid {st.pid}, {len(st.workers)} workers ({workers}), "
            f"listening on {listen}{tok}")


@click.command()
@_conf_file
@click.option("--timeout", type=float, default=15.0, show_default=True,
              help="Seconds to wait until nginx answers HTTP.")
@click.option("--tokenizer-timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait until the tokenizer service answers (configs "
                   "with omni_model_path).")
def start(nginx_conf_file, timeout, tokenizer_timeout):
    """Start the nginx that runs a generated config (and its tokenizer
    service when the config names a model path)."""
    st = nginxctl.start(nginx_conf_file, timeout=timeout,
                        tokenizer_timeout=tokenizer_timeout)
    click.echo(_describe(st))


@click.command()
@_conf_file
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait after QUIT (graceful) before sending TERM.")
@click.option("--rollback", is_flag=True, default=False,
              help="After stopping, put the previous config (PATH.prev) back.")
def stop(nginx_conf_file, timeout, rollback):
    """Stop the nginx that runs a generated config."""
    before = nginxctl.stop(nginx_conf_file, timeout=timeout)
    if before.running:
        click.echo(f"stopped: pid {before.pid}")
    else:
        click.echo(f"not running ({before.note})", err=True)
    if before.tokenizer:
        click.echo(f"stopped tokenizer: pid {before.tokenizer}")
    if rollback:
        bak = nginxctl.rollback_file(nginx_conf_file)
        click.echo(f"restored the previous config from {bak}")


@click.command()
@_conf_file
@conf_options
@click.option("--rollback", is_flag=True, default=False,
              help="Go back to the previous config (PATH.prev) and reload it.")
@click.option("--timeout", type=float, default=15.0, show_default=True,
              help="Seconds to wait for the new workers.")
def reload(nginx_conf_file, rollback, timeout, **options):
    """Test and reload a running config (optionally re-render first).

    With gen-conf options, the config is rendered again from exactly those
    options (as `gen-conf` would), tested, installed and reloaded.  When the
    test fails, the running nginx and the file on disk stay as they were.
    """
    given = given_options(options)
    if rollback and given:
        raise click.UsageError("--rollback takes no gen-conf options")
    text = None
    if given:
        new = conf.make_conf(nginx_conf_file, **given)
        conf.write_secrets(new)
        text = conf.render_conf(new)
    st = nginxctl.reload(nginx_conf_file, new_text=text, rollback=rollback,
                         timeout=timeout)
    click.echo(("rolled back and reloaded; " if rollback else "reloaded; ") + _describe(st))


@click.command()
@_conf_file
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the new master and its workers.")
@click.option("--drain-timeout", type=float, default=600.0, show_default=True,
              help="Seconds the old workers may take to finish their requests.")
def upgrade(nginx_conf_file, timeout, drain_timeout):
    """Replace the running nginx binary on the fly (USR2, WINCH, QUIT).

    A new master runs the nginx binary on disk with the same config and
    listening sockets; the old master's workers stop accepting and finish
    the requests they hold; then the old master exits.  The new master has
    a shared zone of its own: its counters start at zero.
    """
    st = nginxctl.upgrade(nginx_conf_file, timeout=timeout, drain_timeout=drain_timeout)
    click.echo("upgraded; " + _describe(st))


@click.command()
@_conf_file
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON.")
def status(nginx_conf_file, as_json):
    """Show whether the nginx of a config runs, its pid and workers.

    Exits with 3 when it does not run."""
    st = nginxctl.status(nginx_conf_file)
    if as_json:
        click.echo(json.dumps(st.as_dict()))
    elif st.running:
        click.echo(_describe(st))
    for warning in st.warnings:
        click.echo(f"omni-ctl status: warning: {warning}", err=True)
    if not st.running:
        raise nginxctl.NotRunning(f"not running ({st.note})")
