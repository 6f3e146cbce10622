"""Running a simulated cluster: in this process (`run`) or as a subprocess
(`SimCluster`, for tests, the benchmark and the demo)."""

import asyncio
import dataclasses
import json
import logging
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from .faults import Fault
from .presets import DEFAULT_PRESET, get_preset
from .server import Instance, Settings, SimulatedDrop, log
from .tokenizer import load_tokenizer


class SimConfigError(ValueError):
    """A bad option value; `option` names the flag."""

    def __init__(self, option, message):
        super().__init__(f"{option}: {message}")
        self.option = option


@dataclasses.dataclass
class SimConfig:
    prefill: int = 1
    decode: int = 1
    both: int = 0
    base_port: int = 31000
    host: str = "127.0.0.1"
    engine: str = "vllm"
    preset: str = DEFAULT_PRESET
    speedup: float = 1.0
    model: str = "sim-model"
    model_path: str = None
    chat_template: str = None
    num_blocks: int = None
    block_size: int = None
    max_num_seqs: int = None
    max_num_batched_tokens: int = None
    max_model_len: int = None
    jitter: float = None
    tokenize_per_token: float = None
    seed: int = 0
    hash_seed: int = None
    eos_rate: float = 0.0
    default_max_tokens: int = 16
    kv_events: bool = False
    kv_port_offset: int = 100
    kv_events_encoding: str = None
    kv_events_drop_rate: float = 0.0
    kv_events_topic: str = "kv-events"
    kv_events_buffer: int = 10000
    bootstrap_port_offset: int = 300
    kv_transfer_timeout: float = 60.0
    bootstrap_timeout: float = 30.0
    faults: tuple = ()
    check_token_ids: bool = True
    uvloop: bool = True
    oracle_port: int = None
    oracle_slack: float = 0.1


def plan(cfg):
    """[(name, role, port, bootstrap_port)] in port order, after validation."""
    if cfg.engine not in ("vllm", "sglang"):
        raise SimConfigError("--engine", f"must be vllm or sglang, got {cfg.engine!r}")
    for opt, v in (("--prefill", cfg.prefill), ("--decode", cfg.decode), ("--both", cfg.both)):
        if v < 0:
            raise SimConfigError(opt, f"must be >= 0, got {v}")
    n = cfg.prefill + cfg.decode + cfg.both
    if n == 0:
        raise SimConfigError("--prefill", "the cluster has no instance (all counts are 0)")
    if cfg.speedup <= 0:
        raise SimConfigError("--speedup", f"must be > 0, got {cfg.speedup}")
    if not 0.0 <= cfg.kv_events_drop_rate <= 1.0:
        raise SimConfigError("--kv-events-drop-rate", "must be within [0, 1]")
    top = cfg.base_port + n - 1 + max(2 * cfg.kv_port_offset if cfg.kv_events else 0,
                                      cfg.bootstrap_port_offset if cfg.engine == "sglang" else 0)
    if cfg.base_port < 1 or top > 65535:
        raise SimConfigError("--base-port", f"{cfg.base_port} puts ports past 65535")
    if cfg.oracle_port is not None and not 1 <= cfg.oracle_port <= 65535:
        raise SimConfigError("--oracle-port", f"must be within [1, 65535], got {cfg.oracle_port}")
    if cfg.oracle_slack < 0:
        raise SimConfigError("--oracle-slack", f"must be >= 0, got {cfg.oracle_slack}")
    out = []
    port = cfg.base_port
    for role, count in (("prefill", cfg.prefill), ("decode", cfg.decode), ("both", cfg.both)):
        for i in range(count):
            boot = (port + cfg.bootstrap_port_offset
                    if cfg.engine == "sglang" and role == "prefill" else None)
            out.append((f"{role}-{i}", role, port, boot))
            port += 1
    return out


def endpoints_line(cfg, layout):
    pre = [f"{cfg.host}:{p}@{b}" if b is not None else f"{cfg.host}:{p}"
           for _, role, p, b in layout if role == "prefill"]
    dec = [f"{cfg.host}:{p}" for _, role, p, _ in layout if role != "prefill"]
    parts = []
    if pre:
        parts.append("--prefill-endpoints " + ",".join(pre))
    if dec:
        parts.append("--decode-endpoints " + ",".join(dec))
    return " ".join(parts)


def make_settings(cfg):
    try:
        preset = get_preset(cfg.preset)
    except ValueError as exc:
        raise SimConfigError("--preset", str(exc)) from None
    preset = preset.with_overrides(
        num_blocks=cfg.num_blocks, block_size=cfg.block_size,
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=cfg.max_model_len, jitter=cfg.jitter,
        tokenize_per_token=cfg.tokenize_per_token)
    if preset.tokenize_per_token < 0:
        raise SimConfigError("--tokenize-per-token",
                             f"must be >= 0, got {preset.tokenize_per_token}")
    for opt, v in (("--num-blocks", preset.num_blocks), ("--block-size", preset.block_size),
                   ("--max-num-seqs", preset.max_num_seqs),
                   ("--max-num-batched-tokens", preset.max_num_batched_tokens),
                   ("--max-model-len", preset.max_model_len)):
        if v < 1:
            raise SimConfigError(opt, f"must be >= 1, got {v}")
    try:
        tok = load_tokenizer(cfg.model_path, cfg.chat_template)
    except Exception as exc:
        raise SimConfigError("--model-path", f"cannot load a tokenizer from "
                                             f"{cfg.model_path!r}: {exc}") from None
    if cfg.hash_seed is None:
        salt = os.urandom(8)
    else:
        salt = int(cfg.hash_seed).to_bytes(8, "big", signed=True)
    return Settings(preset, tok, model_name=cfg.model, speedup=cfg.speedup,
                    seed=cfg.seed, salt=salt, eos_rate=cfg.eos_rate,
                    default_max_tokens=cfg.default_max_tokens,
                    kv_transfer_timeout=cfg.kv_transfer_timeout,
                    bootstrap_timeout=cfg.bootstrap_timeout,
                    kv_events=cfg.kv_events, kv_port_offset=cfg.kv_port_offset,
                    kv_encoding=cfg.kv_events_encoding,
                    kv_drop_rate=cfg.kv_events_drop_rate, kv_topic=cfg.kv_events_topic,
                    kv_buffer=cfg.kv_events_buffer, check_token_ids=cfg.check_token_ids)


async def serve(cfg, stop_event, on_ready):
    """Start every instance, call on_ready(line), serve until stop_event."""
    layout = plan(cfg)
    faults = []
    for text in cfg.faults:
        try:
            faults.append(Fault.parse_flag(text))
        except ValueError as exc:
            raise SimConfigError("--fault", str(exc)) from None
    names = {name for name, _, _, _ in layout}
    for name, _ in faults:
        if name not in names and name != "all":
            raise SimConfigError("--fault", f"unknown instance {name!r} "
                                            f"(instances: {', '.join(sorted(names))})")
    settings = make_settings(cfg)
    instances = [Instance(settings, name, role, cfg.engine, cfg.host, port, boot, index=i)
                 for i, (name, role, port, boot) in enumerate(layout)]
    settings.instances = instances
    started = []
    oracle = None
    try:
        for inst in instances:
            try:
                await inst.start()
            except OSError as exc:
                raise SimConfigError("--base-port", f"{inst.name} cannot listen on "
                                                    f"{cfg.host}:{inst.port}: {exc}") from None
            started.append(inst)
        for name, fault in faults:
            for inst in instances:
                if name in ("all", inst.name):
                    await inst.set_fault(fault)
        if cfg.oracle_port is not None:
            from .oracle import Oracle
            oracle = Oracle(settings, instances, cfg.engine, cfg.oracle_port,
                            slack=cfg.oracle_slack)
            try:
                await oracle.start()
            except OSError as exc:
                oracle = None
                raise SimConfigError("--oracle-port", f"the oracle router cannot bind 127.0.0.1:"
                                                      f"{cfg.oracle_port}: {exc}") from None
            log(f"oracle router ({oracle.mode}) on {oracle.url}")
        on_ready(endpoints_line(cfg, layout))
        await stop_event.wait()
    finally:
        if oracle is not None:
            try:
                await oracle.stop()
            except Exception as exc:
                log(f"stopping the oracle router: {exc!r}")
        for inst in started:
            try:
                await inst.stop()
            except Exception as exc:   # keep stopping the others
                log(f"stopping {inst.name}: {exc!r}")
        if settings.session is not None:
            await settings.session.close()
        settings.close()


class _QuietFilter(logging.Filter):
    """Keep aiohttp's real errors, drop two expected ones: connections closed
    on purpose by the `drop` fault, and sglang-router's HTTP/2 preface probe
    (logged as a bad request)."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, SimulatedDrop):
            return False
        return not (exc is not None and exc.__class__.__name__ == "BadHttpMessage"
                    and "PRI" in str(exc))


def run(cfg, out=None):
    """Blocking: serve `cfg` until SIGINT/SIGTERM. Prints the endpoints line."""
    out = out or sys.stdout
    plan(cfg)   # fail on bad options before anything heavy
    logging.getLogger("aiohttp.server").addFilter(_QuietFilter())

    async def main():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(line):
            out.write(line + "\n")
            out.flush()
        await serve(cfg, stop, ready)

    if cfg.uvloop:
        try:
            import uvloop
        except ImportError:
            uvloop = None
        if uvloop is not None:
            return uvloop.run(main())
    return asyncio.run(main())


# -- subprocess helper ---------------------------------------------------------

def _ports_free(host, ports):
    for p in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((host, p))
        except OSError:
            return False
        finally:
            s.close()
    return True


class SimClusterError(RuntimeError):
    pass


class SimCluster:
    """`omni-ctl sim` as a subprocess, as a context manager.

        with SimCluster(prefill=2, decode=2, args=["--preset", "tiny"]) as sim:
            sim.prefill_urls, sim.decode_urls, sim.line, sim.stats()

    Without `base_port` a free range is chosen (and retried if the simulator
    still fails to bind). Stop sends SIGTERM to the child's pid, then SIGKILL
    after `stop_timeout`. With `--oracle-port P` in `args`, `oracle_url` is the
    oracle router's address (None otherwise).
    """

    def __init__(self, prefill=1, decode=1, both=0, engine="vllm", preset=None,
                 base_port=None, host="127.0.0.1", args=(), ready_timeout=60.0,
                 stop_timeout=10.0, env=None, retries=4):
        self.prefill, self.decode, self.both = prefill, decode, both
        self.engine = engine
        self.preset = preset
        self.host = host
        self.args = [str(a) for a in args]
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.env = env
        self.retries = retries
        self.fixed_port = base_port
        self.base_port = base_port
        self.proc = None
        self.line = None
        self.returncode = None
        self._stderr = None
        self.prefill_endpoints = []
        self.decode_endpoints = []
        self.oracle_port = self._oracle_port(self.args)
        self.oracle_url = (f"http://127.0.0.1:{self.oracle_port}"
                           if self.oracle_port is not None else None)

    @staticmethod
    def _oracle_port(args):
        for i, a in enumerate(args):
            if a == "--oracle-port" and i + 1 < len(args):
                return int(args[i + 1])
            if a.startswith("--oracle-port="):
                return int(a.split("=", 1)[1])
        return None

    # -- lifecycle
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _command(self, base):
        cmd = [sys.executable, "-m", "omni_ctl.cli", "sim",
               "--prefill", str(self.prefill), "--decode", str(self.decode),
               "--both", str(self.both), "--base-port", str(base),
               "--host", self.host, "--engine", self.engine]
        if self.preset:
            cmd += ["--preset", self.preset]
        return cmd + self.args

    def _pick_base(self):
        n = self.prefill + self.decode + self.both
        rng = random.Random()
        for _ in range(200):
            base = rng.randrange(20000, 55000)
            ports = [base + i + off for i in range(n) for off in (0, 100, 200, 300)]
            if self.oracle_port in ports:
                continue
            if _ports_free(self.host, ports):
                return base
        raise SimClusterError("no free port range found")

    def start(self):
        attempts = 1 if self.fixed_port else self.retries
        last = None
        for _ in range(attempts):
            base = self.fixed_port or self._pick_base()
            try:
                self._launch(base)
                return self
            except SimClusterError as exc:
                last = exc
                if "cannot listen" not in str(exc):
                    break
        raise last

    def _launch(self, base):
        self.base_port = base
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ if self.env is None else self.env)
        self.proc = subprocess.Popen(self._command(base), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        deadline = time.monotonic() + self.ready_timeout
        buf = b""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._kill()
                    raise SimClusterError(f"simulator not ready within {self.ready_timeout}s; "
                                          f"stderr:\n{self.stderr_text()}")
                if sel.select(min(left, 0.5)):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        self.proc.wait()
                        self.returncode = self.proc.returncode
                        raise SimClusterError(
                            f"simulator exited ({self.returncode}) before it was ready; "
                            f"stderr:\n{self.stderr_text()}")
                    buf += chunk
        finally:
            sel.close()
        self.line = buf.split(b"\n", 1)[0].decode().strip()
        self._parse(self.line)

    def _parse(self, line):
        words = line.split()
        self.prefill_endpoints, self.decode_endpoints = [], []
        for flag, value in zip(words[::2], words[1::2]):
            if flag == "--prefill-endpoints":
                self.prefill_endpoints = value.split(",")
            elif flag == "--decode-endpoints":
                self.decode_endpoints = value.split(",")
            else:
                raise SimClusterError(f"unexpected endpoints line: {line!r}")

    def stderr_text(self):
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        """SIGTERM, wait, then SIGKILL. Returns the exit status."""
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
        return self.returncode

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    # -- addresses
    @staticmethod
    def _url(ep):
        return "http://" + ep.split("@", 1)[0]

    @property
    def prefill_urls(self):
        return [self._url(e) for e in self.prefill_endpoints]

    @property
    def decode_urls(self):
        return [self._url(e) for e in self.decode_endpoints]

    @property
    def urls(self):
        return self.prefill_urls + self.decode_urls

    @property
    def bootstrap_ports(self):
        return [int(e.split("@", 1)[1]) if "@" in e else None for e in self.prefill_endpoints]

    # -- small HTTP helpers (urllib, no extra dependency)
    def get_json(self, url, timeout=10.0):
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, url, body, timeout=10.0):
        req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def stats(self, url=None, requests=0):
        url = url or self.urls[0]
        q = f"?requests={requests}" if requests else ""
        return self.get_json(f"{url}/sim/stats{q}")

    def fault(self, url, **body):
        return self.post_json(f"{url}/sim/fault", body)
