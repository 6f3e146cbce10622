"""Where the agent's batches go: the proxy's ingestion endpoint (HTTP POST),
a dump file (batches back to back; each carries its length) or a Python
callable (tests)."""

import logging

import aiohttp

log = logging.getLogger("omni_ctl.agent")


class HttpSink:
    """POST application/octet-stream; any 2xx is success.  With a token,
    every batch carries `Authorization: Bearer TOKEN` (the proxy's status
    token, which its ingestion location requires when one is set)."""

    def __init__(self, url, timeout=2.0, token=None):
        self.url = url
        self.timeout = timeout
        self._session = None
        self._headers = {"Content-Type": "application/octet-stream"}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self.refused = 0            # 401s: no or a wrong token

    async def __call__(self, batch):
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(self.url, data=batch.encode(),
                                          headers=self._headers) as r:
                await r.read()
                if r.status == 401:
                    if not self.refused:
                        log.warning("agent: %s refused the batch (401): the proxy's "
                                    "status token is %s", self.url,
                                    "wrong" if "Authorization" in self._headers
                                    else "required (--push-token-file)")
                    self.refused += 1
                return 200 <= r.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self):
        if self._session is not None:
            await self._session.close()
            self._session = None


class DumpSink:
    def __init__(self, path):
        self.f = open(path, "ab")

    async def __call__(self, batch):
        self.f.write(batch.encode())
        self.f.flush()
        return True

    async def close(self):
        self.f.close()


class ListSink:
    """Keeps every batch (tests)."""

    def __init__(self):
        self.batches = []

    async def __call__(self, batch):
        self.batches.append(batch)
        return True

    def records(self, name=None, kind=None):
        return [r for b in self.batches for r in b.records
                if (name is None or r[1] == name) and (kind is None or r[0] == kind)]
