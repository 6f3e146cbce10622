"""Parallel P/D (SGLang style): the bootstrap rendezvous between two instances.

Every SGLang prefill instance listens on its bootstrap port (a real TCP
listener). A decode instance that admitted a request (its KV blocks allocated)
connects to `bootstrap_host:bootstrap_port` and sends one JSON line naming the
`bootstrap_room` and its prompt. The prefill instance pairs it with its own
request of the same room (whichever side arrives first waits, up to the
bootstrap timeout), answers {"status": "paired"}, runs the prefill, spends the
transfer time, then sends {"status": "done", "first_token": ...} and closes.
Any failure is sent as {"status": "error", "message": ...}; a side that goes
away fails the other side's request. The wire format is the simulator's own:
only the rendezvous semantics mirror SGLang.
"""

import asyncio
import json


class TransferError(Exception):
    pass


class Room:
    __slots__ = ("room", "seq", "prefill_arrived", "decode_arrived", "writer",
                 "decode_msg", "done", "decode_gone")

    def __init__(self, room):
        self.room = room
        self.seq = None
        self.prefill_arrived = asyncio.Event()
        self.decode_arrived = asyncio.Event()
        self.writer = None
        self.decode_msg = None
        self.done = False
        self.decode_gone = False


def _send(writer, msg):
    if writer is not None and not writer.is_closing():
        writer.write(json.dumps(msg).encode() + b"\n")


class BootstrapServer:
    def __init__(self, inst, host, port):
        self.inst = inst
        self.host = host
        self.port = port
        self.rooms = {}
        self.server = None
        self._conns = set()

    async def start(self):
        self.server = await asyncio.start_server(self._on_conn, self.host, self.port,
                                                 reuse_address=True, backlog=1024)

    async def stop(self):
        if self.server is not None:
            self.server.close()
        for w in list(self._conns):
            w.close()
        self.rooms.clear()
        self.server = None

    def pending(self):
        return sum(1 for r in self.rooms.values()
                   if r.seq is not None and not r.decode_arrived.is_set())

    @property
    def timeout(self):
        return self.inst.s.bootstrap_timeout

    # -- the prefill request's side --------------------------------------------
    def room_for(self, seq, room):
        r = self.rooms.get(room)
        if r is None:
            r = Room(room)
            self.rooms[room] = r
        elif r.seq is not None:
            r = Room(room)      # not registered: this request fails below
            r.seq = seq
            self.inst.engine.fail(seq, f"duplicate bootstrap_room {room}")
            return r
        r.seq = seq
        r.prefill_arrived.set()
        return r

    async def pair(self, r):
        seq = r.seq
        if seq.finished:
            return
        try:
            await asyncio.wait_for(r.decode_arrived.wait(), self.timeout)
        except asyncio.TimeoutError:
            self.inst.engine.fail(seq, f"bootstrap timeout: no decode peer connected "
                                       f"for room {r.room} within {self.timeout:g}s")
            return
        m = r.decode_msg or {}
        if m.get("prompt_tokens") != seq.prompt_len or m.get("prompt_digest") != seq.seed:
            msg = (f"the decode request's prompt differs from the prefill request's "
                   f"prompt (room {r.room})")
            _send(r.writer, {"status": "error", "message": msg})
            self.inst.engine.fail(seq, msg)
            return
        _send(r.writer, {"status": "paired", "prefill": self.inst.name})

    async def send_kv(self, r):
        seq = r.seq
        try:
            if seq.error or r.writer is None or r.decode_gone or not seq.output:
                return
            p = self.inst.s.preset
            dur = (p.kv_transfer_base + p.kv_transfer_per_token * seq.prompt_len) / self.inst.s.speedup
            await asyncio.sleep(dur)
            if r.decode_gone:
                return
            _send(r.writer, {"status": "done", "first_token": seq.output[0],
                             "prompt_tokens": seq.prompt_len,
                             "cached_tokens": seq.cached_tokens})
            r.done = True
            r.writer.close()
        finally:
            self.inst.engine.release_held(seq)

    def release(self, r):
        if self.rooms.get(r.room) is r:
            del self.rooms[r.room]
        if not r.done and r.writer is not None and not r.writer.is_closing():
            _send(r.writer, {"status": "error", "message": r.seq.error or
                             f"the prefill request of room {r.room} was cancelled"})
            r.writer.close()
        r.done = True
        if r.seq is not None:
            self.inst.engine.release_held(r.seq)

    # -- the decode instance's connection --------------------------------------
    async def _on_conn(self, reader, writer):
        self._conns.add(writer)
        r = None
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), self.timeout)
                msg = json.loads(line)
                room = msg["room"]
            except (asyncio.TimeoutError, ValueError, KeyError, TypeError):
                _send(writer, {"status": "error", "message": "bad bootstrap handshake"})
                return
            r = self.rooms.get(room)
            if r is None:
                r = Room(room)
                self.rooms[room] = r
            if r.writer is not None:
                _send(writer, {"status": "error",
                               "message": f"room {room} already has a decode peer"})
                r = None
                return
            r.writer = writer
            r.decode_msg = msg
            r.decode_arrived.set()
            try:
                await asyncio.wait_for(r.prefill_arrived.wait(), self.timeout)
            except asyncio.TimeoutError:
                _send(writer, {"status": "error", "message":
                               f"bootstrap timeout: no prefill request for room {room} "
                               f"arrived at {self.inst.name} within {self.timeout:g}s"})
                if self.rooms.get(room) is r:
                    del self.rooms[room]
                return
            try:
                while await reader.read(4096):
                    pass
            except (ConnectionError, OSError):
                pass
            r.decode_gone = True
            if not r.done and r.seq is not None and not r.seq.finished:
                self.inst.engine.fail(r.seq, "the decode peer disconnected before the KV "
                                             "transfer finished")
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(writer)
            writer.close()


async def _read_msg(reader, timeout, what):
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        raise TransferError(f"timed out after {timeout:g}s waiting for {what}") from None
    except (ConnectionError, OSError) as exc:
        raise TransferError(f"bootstrap connection failed: {exc}") from None
    if not line:
        raise TransferError(f"the prefill peer closed the connection while waiting for {what}")
    try:
        return json.loads(line)
    except ValueError:
        raise TransferError("bad bootstrap message") from None


def bootstrap_loader(inst, host, port, room):
    """The decode request's side: rendezvous, then wait for the KV."""

    async def loader(seq):
        timeout = inst.s.bootstrap_timeout
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise TransferError(f"cannot reach bootstrap server {host}:{port}: "
                                f"{exc.__class__.__name__}: {exc}") from None
        try:
            writer.write(json.dumps({"room": room, "decode": inst.name,
                                     "prompt_tokens": seq.prompt_len,
                                     "prompt_digest": seq.seed}).encode() + b"\n")
            await writer.drain()
            msg = await _read_msg(reader, timeout + 1.0, f"the prefill of room {room}")
            if msg.get("status") != "paired":
                raise TransferError(msg.get("message") or "bootstrap failed")
            msg = await _read_msg(reader, inst.s.kv_transfer_timeout,
                                  f"the KV of room {room}")
            if msg.get("status") != "done":
                raise TransferError(msg.get("message") or "KV transfer failed")
            return msg["first_token"]
        finally:
            writer.close()
    return loader
