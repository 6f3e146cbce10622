"""KV-cache events in vLLM's wire format (ZMQ PUB + replay ROUTER).

Each published message is [topic, seq (8-byte big-endian), msgpack payload];
the payload is [timestamp, [event, ...], data_parallel_rank]. Events are either
arrays tagged by class name (`["BlockStored", hashes, parent, token_ids,
block_size, lora_id, medium]`) or maps with a "type" key. The replay socket
answers a start sequence number with every buffered message from there on,
then an end marker, in vLLM 0.33's framing (to a DEALER: [b"", topic, seq,
payload] per message, end [b"", b"", -1, b""]) or, with
replay_format="legacy", older releases' ([b"", seq, payload], end [b"", -1,
b""]).  With data parallelism each rank is its own publisher on port + rank
(`data_parallel_rank` goes in every payload).  `connect` makes the PUB
connect to a subscriber that binds (vLLM does that for a non-wildcard tcp
endpoint) instead of binding itself.

Fault "drop KV events": `drop_rate` (random) or `drop_next(n)` (the next n
messages) consume their sequence numbers without sending them, so the
subscriber sees a gap; they stay in the replay buffer (`buffer_size`
messages), so a gap older than the buffer cannot be replayed.
"""

import asyncio
import collections
import random
import sys
import time

import msgpack
import zmq
import zmq.asyncio

END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


def encode_event(ev, encoding, block_size, medium="GPU"):
    kind = ev[0]
    if kind == "stored":
        _, hashes, parent, tokens = ev
        if encoding == "map":
            return {"type": "BlockStored", "block_hashes": hashes,
                    "parent_block_hash": parent, "token_ids": tokens,
                    "block_size": block_size, "lora_id": None, "medium": medium}
        return ["BlockStored", hashes, parent, tokens, block_size, None, medium]
    if kind == "removed":
        if encoding == "map":
            return {"type": "BlockRemoved", "block_hashes": ev[1], "medium": medium}
        return ["BlockRemoved", ev[1], medium]
    if encoding == "map":
        return {"type": "AllBlocksCleared"}
    return ["AllBlocksCleared"]


class KVEventPublisher:
    def __init__(self, host, pub_port, replay_port, topic="kv-events",
                 encoding="array", drop_rate=0.0, block_size=16,
                 buffer_size=10000, seed=0, data_parallel_rank=None,
                 replay_format="vllm", connect=None):
        if replay_format not in ("vllm", "legacy"):
            raise ValueError(f"replay_format: vllm or legacy, not {replay_format!r}")
        self.host = host
        self.pub_port = pub_port
        self.replay_port = replay_port
        self.topic = topic.encode()
        self.encoding = encoding
        self.drop_rate = drop_rate
        self.block_size = block_size
        self.buffer = collections.deque(maxlen=buffer_size)
        self.rng = random.Random(seed)
        self.data_parallel_rank = data_parallel_rank
        self.replay_format = replay_format
        self.connect = connect
        self.seq = 0
        self._skip = 0
        self.sent = 0
        self.dropped = 0
        self._ctx = None
        self._actx = None
        self._pub = None
        self._router = None
        self._task = None

    @property
    def endpoint(self):
        return f"tcp://{self.host}:{self.pub_port}"

    @property
    def replay_endpoint(self):
        return f"tcp://{self.host}:{self.replay_port}"

    def start(self):
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        if self.connect:
            self._pub.connect(self.connect)
        else:
            self._pub.bind(self.endpoint)
        self._router = self._actx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.replay_endpoint)
        self._task = asyncio.get_running_loop().create_task(self._replay_loop())

    async def stop(self):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for s in (self._pub, self._router):
            if s is not None:
                s.close(0)
        for c in (self._ctx, self._actx):
            if c is not None:
                c.term()
        self._pub = self._router = self._ctx = self._actx = None

    def drop_next(self, n):
        """Fault: lose the next n messages on the wire."""
        self._skip += n

    def publish(self, events):
        if self._pub is None:
            return
        enc = [encode_event(e, self.encoding, self.block_size) for e in events]
        payload = msgpack.packb([time.time(), enc, self.data_parallel_rank],
                                use_bin_type=True)
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        if self._skip or (self.drop_rate and self.rng.random() < self.drop_rate):
            self._skip = max(self._skip - 1, 0)
            self.dropped += 1        # lost on the wire; replay still has it
            return
        try:
            self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload],
                                     flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1

    async def _replay_loop(self):
        sock = self._router
        while True:
            frames = await sock.recv_multipart()
            try:
                ident = frames[0]
                if len(frames) >= 3 and frames[1] == b"":
                    head, start = [ident, b""], frames[2]
                else:
                    head, start = [ident], frames[1]
                first = int.from_bytes(start, "big", signed=True)
                topic = [self.topic] if self.replay_format == "vllm" else []
                for seq, payload in list(self.buffer):
                    if seq >= first:
                        await sock.send_multipart(
                            head + topic + [seq.to_bytes(8, "big"), payload])
                end = [b""] if self.replay_format == "vllm" else []
                await sock.send_multipart(head + end + [END_OF_REPLAY, b""])
            except (IndexError, zmq.ZMQError) as exc:
                print(f"sim: bad replay request: {exc!r}", file=sys.stderr)
