"""`omni-ctl agent`: thin click wrapper over :class:`.core.Agent`."""

import asyncio
import json
import logging
import pathlib
import signal
import sys

import click

from .config import AgentConfigError, build_specs, ingest_key, read_nginx_conf
from .core import Agent, Options
from .sinks import DumpSink, HttpSink
from .status import StatusServer


class AgentOptionError(click.BadParameter):
    pass


def read_key_file(path, option):
    """A key file's text without its line end, as nginx reads it."""
    try:
        key = pathlib.Path(path).read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentOptionError(f"cannot read {path}: {exc}", param_hint=option) from None
    if not key or any(c <= " " or c >= "\x7f" for c in key):
        raise AgentOptionError(f"{path}: not a key (empty, a space or non-ASCII)",
                               param_hint=option)
    return key


def push_token(token_file, conf_path, conf_text):
    """The bearer token for --push: --push-token-file, else the key the
    config's `omni_ingest` location requires (a status token), else None.
    Read from files only, so it never shows on a command line."""
    if token_file:
        return read_key_file(token_file, "--push-token-file")
    key = ingest_key(conf_text) if conf_text is not None else None
    if key is None:
        return None
    kind, value = key
    if kind == "key":
        return value
    return read_key_file(pathlib.Path(conf_path).parent / value, "--conf")


async def run(specs, sinks, opts, duration=None, status_file=None, status_listen=None):
    """Run the agent until SIGINT/SIGTERM or `duration` seconds."""
    async def fan_out(batch):
        ok = True
        for s in sinks:
            ok = (await s(batch)) is not False and ok
        return ok
    agent = Agent(specs, fan_out, opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = StatusServer(agent, *status_listen) if status_listen else None
    await agent.start()
    try:
        if server is not None:
            await server.start()
        await asyncio.wait_for(stop.wait(), duration)
    except asyncio.TimeoutError:
        pass
    finally:
        if server is not None:
            await server.stop()
        await agent.stop()
        for s in sinks:
            await s.close()
    if status_file:
        pathlib.Path(status_file).write_text(json.dumps(agent.status(), indent=1))
    return agent


@click.command(name="agent", help=(
    "Hear the engines (KV events, /metrics, /health) and push what they say "
    "to the proxy's ingestion endpoint in the agent batch format."))
@click.option("--conf", "conf_path", type=click.Path(exists=True, dir_okay=False),
              help="nginx config: instances are the servers of omni_balance upstreams.")
@click.option("--instance", "instances", multiple=True, metavar="HOST:PORT",
              help="An instance (repeatable), besides or instead of --conf.")
@click.option("--block-size", type=int, default=None,
              help="The index's block size (default: omni_block_size of --conf, else 16).")
@click.option("--kv-endpoint", "kv_endpoints", multiple=True, metavar="ADDR=EP[,REPLAY]",
              help="Publisher (and replay endpoint) of an instance; repeat for DP ranks.")
@click.option("--kv-events-port", type=int, default=None,
              help="Publisher port on every instance's host (vLLM's tcp://*:5557).")
@click.option("--kv-replay-port", type=int, default=None, help="Replay port on every host.")
@click.option("--kv-events-port-offset", type=int, default=None,
              help="Publisher port = instance port + OFFSET (the simulator: 100).")
@click.option("--kv-replay-port-offset", type=int, default=None,
              help="Replay port = instance port + OFFSET (the simulator: 200).")
@click.option("--dp-ranks", type=int, default=1, help="DP rank r publishes on port + r.")
@click.option("--kv-bind", is_flag=True,
              help="Bind the SUB sockets (engines connect: vLLM with a non-wildcard endpoint).")
@click.option("--topic", default=Options.topic, show_default=True)
@click.option("--replay-timeout", type=float, default=Options.replay_timeout, show_default=True)
@click.option("--idle-check", type=float, default=Options.idle_check, show_default=True,
              help="Seconds without a message before asking the replay endpoint.")
@click.option("--settle", type=float, default=Options.settle, show_default=True,
              help="Gap-free seconds after a resync before an instance is precise again.")
@click.option("--metrics-interval", type=float, default=Options.metrics_interval, show_default=True,
              help="Seconds between /metrics polls (0: off).")
@click.option("--health-interval", type=float, default=Options.health_interval, show_default=True,
              help="Seconds between /health probes (0: off).")
@click.option("--health-timeout", type=float, default=Options.health_timeout, show_default=True)
@click.option("--fall", type=int, default=Options.fall, show_default=True,
              help="Failed probes in a row that take an instance down.")
@click.option("--rise", type=int, default=Options.rise, show_default=True,
              help="Good probes in a row that bring it back.")
@click.option("--push", "push_url", default=None, metavar="URL",
              help="POST batches here (the proxy's loopback-only ingestion location).")
@click.option("--push-token-file", default=None, type=click.Path(dir_okay=False),
              help="File holding the bearer token for --push (default: the key the "
                   "--conf's omni_ingest location requires, i.e. the status token).")
@click.option("--dump", "dump_path", default=None, type=click.Path(dir_okay=False),
              help="Append every batch to this file.")
@click.option("--flush-interval", type=float, default=Options.flush_interval,
              show_default=True,
              help="At most one push per this many seconds: records after a quiet spell "
                   "go at once, those within the interval of the last push wait for it.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.option("--status-file", default=None, type=click.Path(dir_okay=False),
              help="Write per-instance counters (JSON) here on exit.")
@click.option("--status-listen", default=None, metavar="HOST:PORT",
              help="Serve GET /status (JSON) and /metrics (omni_agent_*) here (loopback).")
@click.option("-v", "--verbose", is_flag=True)
def agent(conf_path, instances, block_size, kv_endpoints, kv_events_port, kv_replay_port,
          kv_events_port_offset, kv_replay_port_offset, dp_ranks, kv_bind, topic,
          replay_timeout, idle_check, settle, metrics_interval, health_interval, health_timeout,
          fall, rise, push_url, push_token_file, dump_path, flush_interval, duration, status_file,
          status_listen, verbose):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        stream=sys.stderr, format="%(asctime)s %(message)s")
    addresses = []
    conf_bs = conf_text = None
    if conf_path:
        conf_text = pathlib.Path(conf_path).read_text()
        try:
            addresses, conf_bs = read_nginx_conf(conf_text)
        except AgentConfigError as exc:
            raise AgentOptionError(str(exc), param_hint="--conf") from None
    addresses += [a for a in instances if a not in addresses]
    if not addresses:
        raise AgentOptionError("no instance: give --conf or --instance", param_hint="--conf")
    for opt, v in (("--fall", fall), ("--rise", rise)):
        if v < 1:
            raise AgentOptionError(f"must be >= 1, got {v}", param_hint=opt)
    bs = block_size or conf_bs or 16
    if not 1 <= bs <= 4096:
        raise AgentOptionError(f"must be within [1, 4096], got {bs}", param_hint="--block-size")
    if not push_url and not dump_path:
        raise AgentOptionError("give --push URL and/or --dump FILE", param_hint="--push")
    try:
        specs = build_specs(addresses, kv_endpoints=kv_endpoints, kv_port=kv_events_port,
                            replay_port=kv_replay_port, kv_port_offset=kv_events_port_offset,
                            replay_port_offset=kv_replay_port_offset, dp_ranks=dp_ranks)
    except AgentConfigError as exc:
        raise AgentOptionError(str(exc).partition(": ")[2], param_hint=exc.option) from None
    listen = None
    if status_listen:
        host, _, port = status_listen.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
            raise AgentOptionError(f"{status_listen!r}: a loopback HOST:PORT",
                                   param_hint="--status-listen")
        listen = (host, int(port))
    for opt, v in (("--idle-check", idle_check), ("--flush-interval", flush_interval)):
        if not v > 0:
            raise AgentOptionError(f"must be > 0, got {v}", param_hint=opt)
    opts = Options(block_size=bs, topic=topic, bind=kv_bind, replay_timeout=replay_timeout,
                   idle_check=idle_check,
                   settle=settle, metrics_interval=metrics_interval,
                   health_interval=health_interval, health_timeout=health_timeout,
                   fall=fall, rise=rise, flush_interval=flush_interval)
    sinks = []
    if push_url:
        try:
            token = push_token(push_token_file, conf_path, conf_text)
        except AgentConfigError as exc:
            raise AgentOptionError(str(exc), param_hint="--conf") from None
        sinks.append(HttpSink(push_url, token=token))
    if dump_path:
        sinks.append(DumpSink(dump_path))
    click.echo(f"agent: {len(specs)} instance(s), block size {bs}", err=True)
    asyncio.run(run(specs, sinks, opts, duration, status_file, listen))
