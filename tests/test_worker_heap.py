"""A worker's heap stays in place across bursts of large request bodies
(issue 23, the 200 KB rounds).

Left to itself, glibc's malloc gives the top of the heap back to the kernel
once more than about twice its largest recent mmap()ed block lies free
there.  A worker with a few dozen 200 KB bodies in flight then shrinks its
heap after every burst and grows it for the next, faulting in and zeroing
every body's pages anew: `perf` put about a tenth of the worker's samples in
page faults and unmapping at 200 KB prompts, and strace saw brk() hundreds of
times a second.  The module fixes malloc's thresholds in the master before
the workers fork (ngx_http_omni_zone.c).

Asserted as a state, not a timing: after a first burst of concurrent large
requests, further identical bursts fault in (almost) no new pages in the
worker, and leave its resident memory where the first left it.

The engine is a small asyncio server in this file that reads each body and
answers after a delay, so that a burst's bodies are all in the worker at
once.  With the sanitizer build the allocator is ASan's, not glibc's, and
the mechanism does not exist: the test says so and skips (run it with the
release build, `bash build.sh --test -- tests/test_worker_heap.py`).
"""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import AsyncioEngine
from omni_ctl import paths

pytestmark = pytest.mark.timeout(120)

BURST = 24            # concurrent requests, as a wrk round's 32 connections
BODY = 256 * 1024     # bytes of prompt
DELAY = 0.3           # the engine's answer, so a burst overlaps
PAGE = 4096
BODY_PAGES = BURST * BODY // PAGE     # a burst's bodies
ANSWER = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": "m",
                     "choices": [{"index": 0, "text": "ok",
                                  "finish_reason": "length"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                               "total_tokens": 2}}).encode()


class SlowEngine(AsyncioEngine):
    """Reads each request's body whole and answers it DELAY later."""

    async def _serve(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                size = next((int(line.split(b":", 1)[1])
                             for line in head.split(b"\r\n")
                             if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(size)
                await asyncio.sleep(DELAY)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def _faults_and_rss(pid: int) -> tuple[int, int]:
    """Minor page faults so far and resident pages of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the name: state is field 3, minflt field 10, rss field 24
    return int(fields[7]), int(fields[21])


def _burst(nginx, prompt: str) -> None:
    def one(_):
        resp = nginx.post("/v1/completions", timeout=30,
                          json={"model": "m", "prompt": prompt, "max_tokens": 1})
        return resp.status
    with ThreadPoolExecutor(BURST) as pool:
        statuses = list(pool.map(one, range(BURST)))
    assert statuses == [200] * BURST, statuses


SANITIZED = paths.build_info().get("debug") == "1"
NOT_GLIBC = ("sanitizer build: the worker's allocator is ASan's, which glibc's "
             "heap thresholds do not govern; run this test with the release build "
             "(bash build.sh --test -- tests/test_worker_heap.py)")


def _proxy(omni_nginx, engine):
    return omni_nginx(pd_policy="aggregated", core_num=1, log_level="notice",
                      schedule_policy="least-loaded",
                      decode_endpoints=f"127.0.0.1:{engine.port}")


def _refaults(nginx) -> tuple[int, int, int]:
    """Page faults of the worker in three bursts that follow a first one,
    and its resident pages before and after them."""
    [worker] = nginx.workers
    prompt = "a" * BODY
    _burst(nginx, prompt)          # the heap grows to its working size
    faults0, rss0 = _faults_and_rss(worker)
    for _ in range(3):
        _burst(nginx, prompt)
    faults, rss = _faults_and_rss(worker)
    return faults - faults0, rss0, rss


def test_bursts_of_large_bodies_do_not_refault_the_heap(omni_nginx):
    if SANITIZED:
        pytest.skip(NOT_GLIBC)
    with SlowEngine() as engine:
        refaults, rss0, rss = _refaults(_proxy(omni_nginx, engine))
        # a heap trimmed after each burst faults every body's pages in again:
        # 3 x 1,536 pages here (3,601 measured on the module before the fix,
        # 1 after)
        assert refaults < BODY_PAGES // 4, (
            f"{refaults} page faults in three bursts of {BURST} x "
            f"{BODY // 1024} KB bodies ({BODY_PAGES} pages a burst)")
        # and the heap kept is the first burst's, not more
        assert rss - rss0 < BODY_PAGES // 4, (rss0, rss)


@pytest.mark.parametrize("tunables, theirs", [
    ("glibc.malloc.trim_threshold=131072", True),
    ("glibc.malloc.arena_max=2", False),
])
def test_an_operators_glibc_tunables_rule(omni_nginx, monkeypatch, tunables, theirs):
    """GLIBC_TUNABLES naming one of malloc's thresholds in nginx's
    environment: the module leaves them alone and says so, and with a small
    trim threshold the heap is given back after every burst again.  Another
    malloc tunable alone keeps the module's thresholds."""
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    with SlowEngine() as engine:
        nginx = _proxy(omni_nginx, engine)
        refaults = None if SANITIZED else _refaults(nginx)[0]
    said = "omni: malloc thresholds left to GLIBC_TUNABLES" in nginx.error_log
    assert said == theirs, nginx.error_log
    if refaults is not None and theirs:
        assert refaults > BODY_PAGES, refaults
    elif refaults is not None:
        assert refaults < BODY_PAGES // 4, refaults
