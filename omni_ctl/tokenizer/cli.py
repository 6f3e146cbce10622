"""`omni-ctl tokenizer`: a thin click wrapper over server.serve()."""

from __future__ import annotations

import os

import click


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@click.command(name="tokenizer", context_settings={"show_default": True})
@click.option("--model-path", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="Local model directory with tokenizer.json (no network).")
@click.option("--socket", "socket_path", default="tokenizer.sock", metavar="PATH",
              help="Unix socket to listen on (omni-ctl start puts it in the nginx prefix).")
@click.option("--pid-file", default=None, metavar="PATH",
              help="Write the parent's pid here once listening; removed at exit.")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Worker processes  [default: the cores this process may run on]")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Jinja chat template file (overrides the model's).")
@click.option("--reuse-cache/--no-reuse-cache", default=True,
              help="Multi-turn reuse cache (encode only what a conversation adds).")
@click.option("--reuse-cache-mb", type=click.IntRange(1), default=32,
              help="Reuse cache size per worker (4 bytes per token).")
@click.option("--verify-reuse", type=click.FloatRange(0, 1), default=0.0,
              help="Fraction of reused encodings also encoded whole, and of directly "
                   "rendered chat templates also rendered by transformers, and compared.")
@click.option("--max-body-mb", type=click.IntRange(1), default=64,
              help="Largest request body.")
@click.option("--worker-sockets", is_flag=True, default=False,
              help="Worker i also listens on SOCKET.i (conversation affinity).")
@click.option("--learn-socket", default=None, metavar="PATH",
              help="Worker i reads the proxy's chat answers on the datagram socket "
                   "PATH.i and caches the conversation through them (answer "
                   "learning: the next turn encodes only its new message).")
@click.option("--learn-handles", type=click.IntRange(0), default=4096,
              help="Chat requests per worker remembered for learning (oldest dropped).")
def tokenizer(model_path, socket_path, pid_file, workers, chat_template, reuse_cache,
              reuse_cache_mb, verify_reuse, max_body_mb, worker_sockets, learn_socket,
              learn_handles):
    """Tokenize requests for nginx over a unix socket (docs/tokenizer.md)."""
    from . import core, server

    template = None
    if chat_template:
        with open(chat_template, encoding="utf-8") as f:
            template = f.read()
    try:
        tok = core.ModelTokenizer(model_path, template, reuse=reuse_cache,
                                  cache_tokens=(reuse_cache_mb << 20) // 4,
                                  verify_rate=verify_reuse,
                                  learn_handles=learn_handles)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        server.serve(tok, socket_path, workers or default_workers(), pid_file,
                     max_body_mb << 20, worker_sockets,
                     learn_socket if reuse_cache else None)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {socket_path}: {exc}") from None
