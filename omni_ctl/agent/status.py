"""The agent's own status over HTTP (loopback): `GET /status` (JSON, as
`Agent.status()`) and `GET /metrics` (Prometheus text, `omni_agent_*`)."""

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# (name, help, status key) of the per-instance counters
_COUNTERS = (
    ("omni_agent_events", "KV events applied", "events"),
    ("omni_agent_gaps", "Sequence gaps seen", "gaps"),
    ("omni_agent_replays", "Replay requests sent", "replays"),
    ("omni_agent_replayed", "Messages recovered by replay", "replayed"),
    ("omni_agent_resyncs", "Resynchronisations (clear + approximate)", "resyncs"),
    ("omni_agent_bad_messages", "Undecodable KV-event messages", "bad_messages"),
    ("omni_agent_scrape_errors", "Failed /metrics polls", "scrape_errors"),
)


class _Collector:
    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        st = self.agent.status()
        inst = st["instances"]
        for name, text, key in _COUNTERS:
            c = CounterMetricFamily(name, text, labels=["instance"])
            for i in inst:
                c.add_metric([i["name"]], i[key])
            yield c
        skipped = CounterMetricFamily("omni_agent_skipped_events", "KV events skipped",
                                      labels=["instance", "reason"])
        for i in inst:
            for reason, n in sorted(i["skipped"].items()):
                skipped.add_metric([i["name"], reason], n)
        yield skipped
        for name, text, fn in (
                ("omni_agent_precise", "1 when the instance's stream is consistent",
                 lambda i: float(i["mode"] == "precise")),
                ("omni_agent_health_up", "1 when /health passes (fall/rise)",
                 lambda i: float(i["health"] == "up")),
                ("omni_agent_event_lag_seconds", "Engine timestamp to reception, last event",
                 lambda i: i["event_lag"] or 0.0),
                ("omni_agent_last_scrape_timestamp_seconds", "Last good /metrics poll",
                 lambda i: i["last_scrape"] or 0.0)):
            g = GaugeMetricFamily(name, text, labels=["instance"])
            for i in inst:
                g.add_metric([i["name"]], fn(i))
            yield g
        yield CounterMetricFamily("omni_agent_pushes", "Batches delivered", value=st["pushed"])
        yield CounterMetricFamily("omni_agent_push_failures", "Batches not delivered",
                                  value=st["push_failures"])


class StatusServer:
    def __init__(self, agent, host, port):
        self.agent = agent
        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(agent))
        self._runner = None

    async def start(self):
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self):
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _status(self, request):
        return web.json_response(self.agent.status())

    async def _metrics(self, request):
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
