"""The tokenizer service's HTTP/1.1 server on a unix socket.

The parent binds the socket, loads the tokenizer once and forks the workers
(unix sockets have no SO_REUSEPORT, so the workers share the one listening
socket and the kernel hands each connection to one of them).  Each worker is
a single-threaded asyncio loop: tokenization is CPU work, one request at a
time per core, and idle keep-alive connections from nginx cost nothing.  The
parent restarts a worker that dies and, on SIGTERM/SIGINT, stops the workers
and removes the socket and the pid file.

With worker_sockets, worker i also listens on PATH.i of its own, so a
client that sends a conversation's turns to one worker (nginx: an upstream
of the PATH.i sockets with `hash KEY consistent`) always finds its earlier
turns in that worker's reuse cache.

With a learn socket, worker i also reads learn datagrams (wire.learn_message)
on its own unix SOCK_DGRAM socket LEARN.i: a chat request posted with
`?learn=1` gets a handle in its answer (worker index in the top 16 bits), and
the proxy sends that worker the engine's answer for it once it has streamed
back (core.ModelTokenizer.learn), off the client's request path.

Routes (docs/tokenizer.md): POST /v1/completions, POST /v1/chat/completions
(the client's JSON body; the answer is wire.encode's binary body),
GET /health, GET /stats (JSON counters of the worker that answers).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import select
import signal
import socket
import stat
import sys
import time

from . import core, wire

MAX_HEADER = 64 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required",
            413: "Payload Too Large", 422: "Unprocessable Entity",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def error_body(message: str, status: int) -> bytes:
    """The error body vLLM's OpenAI server sends."""
    etype = "BadRequestError" if status == 400 else (
        "NotFoundError" if status == 404 else "InternalServerError"
        if status >= 500 else "UnprocessableEntityError")
    return json.dumps({"error": {"message": message, "type": etype,
                                 "param": None, "code": status}}).encode()


class App:
    """Request -> (status, content type, body); no I/O here."""

    def __init__(self, tokenizer: core.ModelTokenizer, max_body: int):
        self.tok = tokenizer
        self.max_body = max_body
        self.pid = os.getpid()

    def handle(self, method: str, path: str, body: bytes):
        path, _, query = path.partition("?")
        if path == "/health":
            return 200, "text/plain", b"ok\n"
        if path == "/stats":
            stats = dict(self.tok.stats, pid=os.getpid(),
                         cache_tokens=self.tok.cache.tokens,
                         cache_entries=len(self.tok.cache.lru),
                         pending_handles=len(self.tok.pending))
            return 200, "application/json", json.dumps(stats).encode()
        if path not in core.ROUTES:
            return 404, "application/json", error_body(f"no route {path}", 404)
        if method != "POST":
            return 405, "application/json", error_body(f"{path} takes POST", 405)
        # the service's own time per answer (parse, tokenize, encode the
        # answer), without the transport: /stats busy_s, cpu_s; `reuse=0`
        # (a benchmark's side without the cache, in the same worker) is
        # timed apart: noreuse_requests, noreuse_busy_s, noreuse_cpu_s
        args = query.split("&")
        reuse = "reuse=0" not in args
        key = "" if reuse else "noreuse_"
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return self._tokenize(path, body, "learn=1" in args, reuse)
        finally:
            stats = self.tok.stats
            stats[key + "busy_s"] += time.perf_counter() - wall
            stats[key + "cpu_s"] += time.process_time() - cpu
            if not reuse:
                stats["noreuse_requests"] += 1

    def learn(self, data: bytes) -> None:
        """One learn datagram (wire.learn_message); counted, never answered."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            try:
                handle, answer = wire.learn_decode(data)
            except wire.WireError:
                self.tok.stats["learn_bad"] += 1
                return
            self.tok.learn(handle, answer)
        finally:
            self.tok.stats["learn_busy_s"] += time.perf_counter() - wall
            self.tok.stats["learn_cpu_s"] += time.process_time() - cpu

    def _tokenize(self, path: str, body: bytes, learn: bool = False,
                  reuse: bool = True):
        try:
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise core.BadRequest(f"the body is not valid JSON: {exc}") from None
            res = self.tok.tokenize(path, data, learn, reuse)
        except core.IdsGiven:
            flags = wire.FLAG_IDS_GIVEN | (wire.FLAG_CHAT if path == core.CHAT else 0)
            return 200, wire.CONTENT_TYPE, wire.encode([], flags)
        except core.BadRequest as exc:
            return 400, "application/json", error_body(str(exc), 400)
        except core.Unsupported as exc:
            return 422, "application/json", error_body(str(exc), 422)
        flags = (wire.FLAG_CHAT if res.chat else 0) \
            | (wire.FLAG_SGLANG_SAFE if res.sglang_safe else 0) \
            | (wire.FLAG_REUSED if res.reused else 0)
        return 200, wire.CONTENT_TYPE, wire.encode(res.prompts, flags, res.reused,
                                                   res.handle)


def _response(status: int, ctype: str, body: bytes, keep: bool) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n")
    return head.encode("latin-1") + body


async def _read_chunked(reader, limit):
    parts, size = [], 0
    while True:
        line = await reader.readline()
        try:
            n = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ValueError("bad chunk size") from None
        if n == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass            # trailers
            return b"".join(parts)
        size += n
        if size > limit:
            raise OverflowError
        parts.append(await reader.readexactly(n))
        await reader.readexactly(2)


async def serve_connection(app: App, reader, writer):
    """Requests of one keep-alive connection, one after the other."""
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return          # the peer closed between requests
            except asyncio.LimitOverrunError:
                writer.write(_response(431, "text/plain", b"headers too large\n", False))
                await writer.drain()
                return
            lines = head.decode("latin-1").split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                writer.write(_response(400, "text/plain", b"bad request line\n", False))
                await writer.drain()
                return
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            conn = headers.get("connection", "").lower()
            keep = conn != "close" and (version == "HTTP/1.1" or conn == "keep-alive")
            try:
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    body = await _read_chunked(reader, app.max_body)
                else:
                    n = int(headers.get("content-length", "0"))
                    if n < 0:
                        raise ValueError
                    if n > app.max_body:
                        raise OverflowError
                    body = await reader.readexactly(n)
            except OverflowError:
                writer.write(_response(413, "application/json", error_body(
                    f"the body is larger than {app.max_body} bytes", 413), False))
                await writer.drain()
                return
            except ValueError:
                writer.write(_response(400, "text/plain", b"bad body framing\n", False))
                await writer.drain()
                return
            if method == "POST" and _hung_up(writer):
                # the client gave up on it (nginx closes the connection at
                # its deadline): nobody would read the answer, and serving
                # it would make the requests behind it late too
                app.tok.stats["abandoned"] += 1
                return
            try:
                status, ctype, payload = app.handle(method, target, body)
            except Exception as exc:    # a bug: answer it, keep serving
                status, ctype, payload = 500, "application/json", error_body(
                    f"tokenizer service error: {exc.__class__.__name__}: {exc}", 500)
            writer.write(_response(status, ctype, payload, keep))
            await writer.drain()
            if not keep:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def _hung_up(writer) -> bool:
    """Whether the peer has closed the connection (both ways: a client that
    only shut down its sending side still reads the answer)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


class _Stop(Exception):
    """SIGTERM/SIGINT in the parent."""


def _die_with_parent():
    # Linux: the kernel sends SIGTERM to the worker when the parent dies
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _read_learns(app: App, sock: socket.socket) -> None:
    """Every datagram queued on the learn socket (non-blocking)."""
    while True:
        try:
            data = sock.recv(LEARN_MAX + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            app.tok.stats["learn_bad"] += 1
            return
        if len(data) > LEARN_MAX:
            app.tok.stats["learn_bad"] += 1     # cut: never learn a part
            continue
        try:
            app.learn(data)
        except Exception as exc:    # noqa: BLE001 - a bug: count it, keep serving
            app.tok.stats["learn_failed"] += 1
            log(f"learning failed: {exc!r}")


def bind_learn_socket(path: str) -> socket.socket:
    """This worker's learn socket (its index is its own: a file left there
    is a dead predecessor's)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    # a burst of answers queues here while a request is tokenized
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    return sock


def _worker(socks: list[socket.socket], app: App, parent: int,
            learn: socket.socket | None = None) -> None:
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    app.pid = os.getpid()
    # the loaded tokenizer and template never become garbage: out of the
    # collector's passes (and the pages stay shared with the parent)
    gc.freeze()

    async def main():
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
        servers = [await asyncio.start_unix_server(
            lambda r, w: serve_connection(app, r, w), sock=s, limit=MAX_HEADER)
            for s in socks]
        if learn is not None:
            loop.add_reader(learn.fileno(), _read_learns, app, learn)
        await stop
        for server in servers:
            server.close()
    asyncio.run(main())


def bind_socket(path: str) -> socket.socket:
    """A listening unix socket at path; a stale socket file is replaced, a
    live one (someone answers on it) is an error."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)     # nobody listens: left over from a crash
        else:
            raise OSError(f"{path}: another process listens on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    # nginx workers may run as another user than the service
    os.chmod(path, 0o666)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _write_pid(pid_file: str) -> None:
    tmp = f"{pid_file}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, pid_file)


def log(msg: str) -> None:
    print(f"omni-ctl tokenizer[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def worker_socket(socket_path: str, index: int) -> str:
    return f"{socket_path}.{index}"


# the largest learn datagram read (the proxy caps what it sends below this)
LEARN_MAX = 1 << 20
# the longest unix socket path (Linux: sun_path, 108 bytes with the NUL)
SUN_PATH = 107


def serve(tokenizer: core.ModelTokenizer, socket_path: str, workers: int,
          pid_file: str | None = None, max_body: int = 64 << 20,
          worker_sockets: bool = False, learn_socket: str | None = None) -> None:
    """Run until SIGTERM/SIGINT.  The pid file is written once the socket
    listens and the workers are forked."""
    sock = bind_socket(socket_path)
    app = App(tokenizer, max_body)
    if learn_socket and len(os.fsencode(worker_socket(learn_socket, workers))) > SUN_PATH:
        log(f"no answer learning: {learn_socket}.N is too long for a unix socket")
        learn_socket = None
    # the workers' own sockets (conversation affinity, learning)
    own = [worker_socket(base, i) for base in (
        socket_path if worker_sockets else None, learn_socket) if base
        for i in range(workers)]
    parent = os.getpid()
    children: dict[int, tuple[float, int]] = {}    # pid -> (started, index)

    def spawn(index):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                socks = [sock]
                if worker_sockets:
                    socks.append(bind_socket(worker_socket(socket_path, index)))
                learn = None
                if learn_socket:
                    try:
                        learn = bind_learn_socket(worker_socket(learn_socket, index))
                    except OSError as exc:
                        # e.g. a path too long for a unix socket: serve without
                        log(f"no answer learning: {exc}")
                    else:
                        app.tok.start_handles(index)
                _worker(socks, app, parent, learn)
            except BaseException as exc:   # noqa: BLE001 - report, then exit
                log(f"worker failed: {exc!r}")
                code = 1
            os._exit(code)
        children[pid] = (time.monotonic(), index)

    def on_stop(signum, frame):
        # waitpid is retried after a signal (PEP 475): leave it by raising
        raise _Stop()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    try:
        for index in range(workers):
            spawn(index)
        if pid_file:
            if own:
                # the pid file says ready: every worker socket must exist
                deadline = time.monotonic() + 30.0
                while time.monotonic() < deadline and not all(
                        os.path.exists(p) for p in own):
                    time.sleep(0.01)
            _write_pid(pid_file)
        log(f"listening on {socket_path} with {workers} workers "
            f"({tokenizer.model_path})")
        while True:
            pid, status = os.waitpid(-1, 0)
            child = children.pop(pid, None)
            if child is None:
                continue
            started, index = child
            log(f"worker {pid} exited ({status:#x}); starting another")
            if time.monotonic() - started < 1.0:
                time.sleep(1.0)     # a worker that dies at once: do not spin
            spawn(index)
    except (_Stop, ChildProcessError):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                children.pop(pid, None)
        deadline = time.monotonic() + 5.0
        while children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                children.pop(pid, None)
            else:
                time.sleep(0.02)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sock.close()
        for path in [socket_path, pid_file] + own:
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        log("stopped")
