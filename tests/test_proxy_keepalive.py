"""An engine closing an idle keep-alive connection as nginx reuses it: the
request is retried once on a new connection, and the client never sees it.

The engine is a small asyncio HTTP/1.1 server in this file (the simulator
cannot be told to close idle connections).  It keeps connections open, but
a request arriving on a connection idle for more than IDLE seconds is
answered by closing the connection without a response: the race a real
engine with a 1 s idle timeout loses now and then (its FIN crosses our
request), made to happen on every reuse so the test is deterministic.
"""

import asyncio
import json
import time

import pytest

from conftest import AsyncioEngine, wait_until
from test_proxy_errors import _idle

pytestmark = pytest.mark.timeout(120)

IDLE = 1.0
ANSWER = {"id": "cmpl-1", "object": "text_completion", "model": "m",
          "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class ClosingEngine(AsyncioEngine):
    def __init__(self):
        super().__init__()
        self.served = 0
        self.closed_on_reuse = 0

    async def _serve(self, reader, writer):
        last = None
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if last is not None and time.monotonic() - last > IDLE:
                    self.closed_on_reuse += 1
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                body = json.dumps(ANSWER).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
                self.served += 1
                last = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError,
                asyncio.CancelledError):
            pass
        finally:
            writer.close()


def test_request_on_a_closed_idle_connection_is_retried(omni_nginx):
    with ClosingEngine() as engine:
        nginx = omni_nginx(pd_policy="aggregated", core_num=1,
                           decode_endpoints=f"127.0.0.1:{engine.port}",
                           schedule_policy="least-loaded")
        for i in range(4):
            if i:
                # past the engine's idle timeout: the next request reuses a
                # connection the engine closes
                since = time.monotonic()
                wait_until(lambda: time.monotonic() - since > IDLE + 0.3,
                           timeout=5, what="the engine's idle timeout")
            resp = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert resp.status == 200, (i, resp.status, resp.text)
            assert resp.json()["choices"][0]["text"] == "ok"
        # the race happened (else the test shows nothing) and cost no error
        assert engine.closed_on_reuse >= 1
        wait_until(lambda: engine.served == 4, timeout=5, what="4 answers served")
        status = _idle(nginx)
        inst = status["instances"][0]
        assert inst["fails"] == 0 and inst["errors_total"] == 0, inst
