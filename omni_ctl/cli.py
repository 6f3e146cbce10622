"""`omni-ctl`: the command-line entry point.

Commands are thin click wrappers that live next to the code they drive; this
file only maps command names to them and imports a command's module when that
command runs, so `omni-ctl --help` stays fast (no tokenizer, no plotting).
"""

import importlib
import signal

import click

# name -> "module:attribute" of a click.Command
COMMANDS = {
    "gen-conf": "omni_ctl.conf_cli:gen_conf",
    "start": "omni_ctl.nginxctl_cli:start",
    "stop": "omni_ctl.nginxctl_cli:stop",
    "reload": "omni_ctl.nginxctl_cli:reload",
    "upgrade": "omni_ctl.nginxctl_cli:upgrade",
    "status": "omni_ctl.nginxctl_cli:status",
    "sim": "omni_ctl.sim.cli:sim",
    "tokenizer": "omni_ctl.tokenizer.cli:tokenizer",
    "bench": "omni_ctl.bench.cli:bench",
    "compare": "omni_ctl.bench.cli:compare",
    "bench-overhead": "omni_ctl.bench.cli:bench_overhead",
    "demo": "omni_ctl.bench.cli:demo",
    "chaos": "omni_ctl.bench.cli:chaos",
    "dashboard": "omni_ctl.dashboard:dashboard_cmd",
    "explain": "omni_ctl.bench.cli:explain",
    "bench-lib": "omni_ctl.bench.lib:bench_lib",
    "agent": "omni_ctl.agent.cli:agent",
}

HELP = {
    "gen-conf": "Render nginx.conf for Omni Proxy from the templates.",
    "start": "Start the nginx that runs a generated config.",
    "stop": "Stop the nginx that runs a generated config.",
    "reload": "Test and reload a running config (optionally re-render first).",
    "upgrade": "Replace the running nginx binary on the fly (USR2, WINCH, QUIT).",
    "status": "Show whether the nginx of a config runs, its pid and workers.",
    "tokenizer": "Serve the model's tokenizer to nginx on a unix socket.",
    "sim": "Run a simulated P/D inference cluster (vLLM/SGLang protocols).",
    "bench": "Load-test an OpenAI-compatible endpoint (TTFT, TPOT, goodput).",
    "compare": "Run one workload through several routers on one simulated cluster.",
    "bench-overhead": "Measure proxy overhead against plain nginx and peer routers.",
    "demo": "Start a simulated cluster and Omni Proxy, compare with round robin.",
    "chaos": "Replay a workload while the simulated cluster fails on a schedule.",
    "dashboard": "Print the Grafana dashboard JSON for the proxy's metrics.",
    "explain": "Attribute each request's TTFT in an Omni Proxy run to its causes.",
    "bench-lib": "Benchmark the scoring library (hashing, index, JSON).",
    "agent": "Hear the engines (KV events, metrics, health) and feed the proxy.",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when invoked."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return _missing(name)
        return getattr(module, attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, HELP.get(name, "")) for name in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _missing(name):
    @click.command(name=name, help=HELP.get(name, ""))
    def cmd():
        raise click.ClickException(f"'{name}' is not available in this build")
    return cmd


def _exit(signum, frame):
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """SIGTERM (a CI timeout, `kill PID`) unwinds like Ctrl-C, so a command's
    cleanup runs: the benchmarks stop the nginx, routers, simulators and
    tokenizers they started and remove their temp prefixes (by default the
    process would die with them left running).  Only where SIGTERM is still
    the default: the services that handle it themselves (tokenizer, agent,
    simulator) set their own afterwards."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="omni-proxy")
def main():
    """Omni Proxy control plane: configure and run the nginx-based P/D
    scheduler, its simulator and its benchmarks."""
    exit_on_sigterm()


if __name__ == "__main__":
    main()
