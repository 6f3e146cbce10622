"""`omni-ctl sim`: a thin click wrapper over omni_ctl.sim.cluster.run()."""

import click

from .presets import DEFAULT_PRESET, PRESETS


class SimOptionError(click.ClickException):
    """A bad option: names the option and its value."""


@click.command(name="sim", context_settings={"show_default": True})
@click.option("--prefill", type=int, default=1, help="Prefill instances (ports B..B+N-1).")
@click.option("--decode", type=int, default=1, help="Decode instances (after the prefill ones).")
@click.option("--both", type=int, default=0,
              help="Aggregated instances (role both, after decode; listed with --decode-endpoints).")
@click.option("--base-port", type=int, required=True, help="First HTTP port.")
@click.option("--host", default="127.0.0.1", help="Address every listener binds.")
@click.option("--engine", type=click.Choice(["vllm", "sglang"]), default="vllm",
              help="Protocol flavour: vllm (sequential P/D) or sglang (parallel P/D).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=DEFAULT_PRESET,
              help="Cost model and engine limits (docs/simulator.md).")
@click.option("--speedup", type=float, default=1.0, help="Divide every step and transfer time by X.")
@click.option("--model", default="sim-model", help="Served model name.")
@click.option("--model-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local tokenizer directory (transformers AutoTokenizer); built-in tokenizer otherwise.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Jinja chat template file for --model-path tokenizers without one.")
@click.option("--num-blocks", type=int, default=None, help="Override the preset's KV blocks.")
@click.option("--block-size", type=int, default=None, help="Override tokens per KV block.")
@click.option("--max-num-seqs", type=int, default=None, help="Override the batch's request limit.")
@click.option("--max-num-batched-tokens", type=int, default=None, help="Override the step token budget.")
@click.option("--max-model-len", type=int, default=None, help="Override the context length.")
@click.option("--jitter", type=float, default=None, help="Relative std-dev of step times.")
@click.option("--tokenize-per-token", type=float, default=None, metavar="SECONDS",
              help="Override the engine's tokenization cost per prompt token sent as text.")
@click.option("--seed", type=int, default=0, help="Seed for jitter, error rates and event drops.")
@click.option("--hash-seed", type=int, default=None,
              help="Seed of the KV block hashes (random per process by default, like vLLM).")
@click.option("--eos-rate", type=float, default=0.0,
              help="Per-token probability of a natural EOS (0: only max_tokens ends a request).")
@click.option("--default-max-tokens", type=int, default=16, help="max_tokens when a request gives none.")
@click.option("--kv-events/--no-kv-events", default=False, help="Publish KV-cache events over ZMQ.")
@click.option("--kv-port-offset", type=int, default=100,
              help="PUB on port+OFFSET, replay ROUTER on port+2*OFFSET.")
@click.option("--kv-events-encoding", type=click.Choice(["array", "map"]), default=None,
              help="Event encoding (default: array for vllm, map for sglang).")
@click.option("--kv-events-drop-rate", type=float, default=0.0,
              help="Fraction of event messages not sent (still replayable).")
@click.option("--kv-events-topic", default="kv-events", help="ZMQ topic frame.")
@click.option("--kv-events-buffer", type=int, default=10000, help="Messages kept for replay.")
@click.option("--bootstrap-port-offset", type=int, default=300,
              help="SGLang prefill bootstrap port = its HTTP port + OFFSET.")
@click.option("--kv-transfer-timeout", type=float, default=60.0,
              help="Seconds a prefill keeps KV for a decode that never pulls it.")
@click.option("--bootstrap-timeout", type=float, default=30.0,
              help="Seconds either side of a parallel P/D pair waits for its peer.")
@click.option("--fault", "faults", multiple=True, metavar="NAME=MODE[,k=v...]",
              help="Start with a fault, e.g. decode-0=error,rate=0.5 (repeatable; NAME may be 'all').")
@click.option("--check-token-ids/--no-check-token-ids", default=True,
              help="Count forwarded token ids that differ from the simulator's own "
                   "tokenization (sim:token_parity_mismatch_total).")
@click.option("--uvloop/--no-uvloop", default=True, help="Use uvloop when it is installed.")
@click.option("--oracle-port", type=int, default=None,
              help="Also run the oracle router (exact cache and queue knowledge) on 127.0.0.1:PORT.")
@click.option("--oracle-slack", type=float, default=0.1,
              help="Oracle: prefill instances within this fraction (+ one step) of the best "
                   "predicted TTFT are equivalent; the longest cache hit among them wins.")
def sim(**opts):
    """Run a simulated P/D inference cluster (vLLM/SGLang protocols).

    Prints one line `--prefill-endpoints LIST --decode-endpoints LIST` once
    every instance listens, then serves until SIGINT/SIGTERM.
    """
    from .cluster import SimConfig, SimConfigError, run

    cfg = SimConfig(**opts)
    try:
        run(cfg)
    except SimConfigError as exc:
        raise SimOptionError(str(exc)) from None
