"""`omni-ctl gen-conf`: a thin click layer over omni_ctl.conf.

Every option defaults to None ("not given") here; the real defaults live in
conf.DEFAULTS so that Python callers and the CLI agree.  `reload` reuses
these options (conf_options) to re-render before reloading.
"""

from __future__ import annotations

import click

from . import conf

_D = conf.DEFAULTS


def _help(text: str, key: str | None = None) -> str:
    if key is None or _D.get(key) is None:
        return text
    return f"{text} [default: {_D[key]}]"


# (param decls, click kwargs); order is the order shown by --help
CONF_OPTIONS = [
    (("--prefill-endpoints",), dict(metavar="H:P[@BOOT],...", help=_help(
        "Prefill instances, comma separated; IPv6 as [::1]:8001; @BOOT is an "
        "SGLang bootstrap port (parallel mode, default 8998)."))),
    (("--decode-endpoints",), dict(metavar="H:P,...", help=_help(
        "Decode instances (in aggregated mode: the only tier)."))),
    (("--pd-policy",), dict(type=click.Choice(conf.PD_POLICIES), help=_help(
        "sequential (vLLM), parallel (SGLang) or aggregated (no P/D).", "pd_policy"))),
    (("--schedule-policy",), dict(type=click.Choice(conf.SCHEDULE_POLICIES), help=_help(
        "How instances are chosen.", "schedule_policy"))),
    (("--prefill-queue-order",), dict(type=click.Choice(conf.QUEUE_ORDERS), help=_help(
        "Order of held prefill requests.", "prefill_queue_order"))),
    (("--listen-host",), dict(metavar="IP", help=_help(
        "Address to listen on (0.0.0.0 for all).", "listen_host"))),
    (("--listen-port",), dict(type=int, metavar="PORT", help=_help(
        "Port to listen on.", "listen_port"))),
    (("--core-num",), dict(type=int, metavar="N", help=_help(
        "Worker processes, one pinned per core.", "core_num"))),
    (("--start-core-index",), dict(type=int, metavar="N", help=_help(
        "First core; workers use cores N..N+core-num-1.", "start_core_index"))),
    (("--model-path",), dict(metavar="DIR", help=_help(
        "Model directory (tokenizer, chat template)."))),
    (("--prefix",), dict(metavar="DIR", help=_help(
        "Directory for the pid file, logs and temp files "
        "[default: the conf file's directory]"))),
    (("--log-file",), dict(metavar="PATH", help=_help(
        "nginx error log [default: PREFIX/error.log]"))),
    (("--log-level",), dict(type=click.Choice(conf.LOG_LEVELS), help=_help(
        "error_log level.", "log_level"))),
    (("--access-log-file",), dict(metavar="PATH|off", help=_help(
        "Access log in the `omni` format [default: PREFIX/access.log]"))),
    (("--max-batch-num-token",), dict(type=int, metavar="N", help=_help(
        "Prefill tokens per instance batch.", "max_batch_num_token"))),
    (("--prefill-max-num-seqs",), dict(type=int, metavar="N", help=_help(
        "Requests in flight per prefill instance.", "prefill_max_num_seqs"))),
    (("--decode-max-num-seqs",), dict(type=int, metavar="N", help=_help(
        "Requests in flight per decode instance.", "decode_max_num_seqs"))),
    (("--prefill-starvation-timeout",), dict(metavar="MS", help=_help(
        "A prefill request held this long goes first (bare number: ms).",
        "prefill_starvation_timeout"))),
    (("--queue-max",), dict(type=int, metavar="N", help=_help(
        "Held requests before new ones get 429.", "queue_max"))),
    (("--queue-timeout",), dict(metavar="TIME", help=_help(
        "Longest a request is held before 503.", "queue_timeout"))),
    (("--decode-max-tokens",), dict(type=int, metavar="N", help=_help(
        "KV-token budget per decode instance (prompt + expected output of "
        "the work in flight; 0: none).", "decode_max_tokens"))),
    (("--hold-slack",), dict(metavar="MS", help=_help(
        "Release a request to an instance predicted busy for at most this "
        "long (bare number: ms).", "hold_slack"))),
    (("--block-size",), dict(type=int, metavar="N", help=_help(
        "Tokens per block of the proxy's prefix index (text: 4 bytes per "
        "token).", "block_size"))),
    (("--index-max-tokens",), dict(type=int, metavar="N", help=_help(
        "Prompt tokens indexed per request (the leading ones).",
        "index_max_tokens"))),
    (("--cache-blocks",), dict(type=int, metavar="N", help=_help(
        "Prefix-cache capacity assumed per instance, in index blocks "
        "(0: share the index's capacity).", "cache_blocks"))),
    (("--cache-ttl",), dict(metavar="TIME", help=_help(
        "How long the index assumes a dispatched prefix stays cached.",
        "cache_ttl"))),
    (("--worker-connections",), dict(type=int, metavar="N", help=_help(
        "Connections per worker (clients and upstreams).", "worker_connections"))),
    (("--zone-size",), dict(metavar="SIZE", help=_help(
        "Shared-memory zone size.", "zone_size"))),
    (("--prefill-read-timeout",), dict(metavar="TIME", help=_help(
        "Read/send timeout of the prefill leg.", "prefill_read_timeout"))),
    (("--decode-read-timeout",), dict(metavar="TIME", help=_help(
        "Read/send timeout of the decode leg and plain proxying.",
        "decode_read_timeout"))),
    (("--connect-timeout",), dict(metavar="TIME", help=_help(
        "Upstream connect timeout.", "connect_timeout"))),
    (("--keepalive",), dict(type=int, metavar="N", help=_help(
        "Idle upstream connections kept per worker and tier.", "keepalive"))),
    (("--max-body-size",), dict(metavar="SIZE", help=_help(
        "Largest request body (0: no limit).", "max_body_size"))),
    (("--max-fails",), dict(type=int, metavar="N", help=_help(
        "Failures within --fail-timeout that mark an instance down (0: never).",
        "max_fails"))),
    (("--fail-timeout",), dict(metavar="TIME", help=_help(
        "Window for --max-fails and how long a failed instance rests.",
        "fail_timeout"))),
    (("--module-dir",), dict(metavar="DIR", help=_help(
        "Where ngx_http_omni_module.so is [default: $OMNI_MODULE_DIR or "
        "build/modules]"))),
    (("--user",), dict(metavar="NAME", help=_help(
        "Worker user when nginx starts as root [default: nginx's own]"))),
]


def conf_options(func):
    """Add every gen-conf option (not --nginx-conf-file/--check) to a command."""
    for decls, kwargs in reversed(CONF_OPTIONS):
        func = click.option(*decls, default=None, **kwargs)(func)
    return func


def given_options(params: dict) -> dict:
    """The gen-conf options of a command's params that were given."""
    names = {decls[0].lstrip("-").replace("-", "_") for decls, _ in CONF_OPTIONS}
    return {k: v for k, v in params.items() if k in names and v is not None}


@click.command(name="gen-conf")
@click.option("--nginx-conf-file", required=True, metavar="PATH",
              help="Where to write nginx.conf (the previous file is kept as PATH.prev).")
@conf_options
@click.option("--check", is_flag=True, default=False,
              help="Test the result with `nginx -t` before installing it.")
@click.option("--allow-missing-cores", is_flag=True, default=False,
              help="Accept cores this machine lacks (a config for another machine).")
def gen_conf(nginx_conf_file, check, allow_missing_cores, **options):
    """Render nginx.conf for Omni Proxy from the templates."""
    result = conf.generate(nginx_conf_file, check=check,
                           allow_missing_cores=allow_missing_cores,
                           **given_options(options))
    ncpu = conf.cpu_count()
    if max(result.conf.cores) >= ncpu:
        click.echo(f"warning: workers are pinned to cores up to {max(result.conf.cores)} "
                   f"but this machine has {ncpu} cores (0-{ncpu - 1})", err=True)
    if not result.conf.module_path.is_file():
        click.echo(f"warning: {result.conf.module_path} does not exist yet "
                   "(run `bash build.sh`)", err=True)
    if result.backup:
        click.echo(f"previous config kept as {result.backup}", err=True)
    if check:
        click.echo("nginx -t: ok", err=True)
    click.echo(str(result.conf.conf_file))
