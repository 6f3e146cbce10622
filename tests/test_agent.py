"""`omni-ctl agent` against the simulator's real KV-event publisher
(omni_ctl/sim/kvevents.py, in-process on loopback ZMQ), its batches applied
through omni_ingest into a real prefix index."""

import asyncio
import random
import socket
import time

import pytest

from omni_ctl.agent import batch as B
from omni_ctl.agent.config import build_specs
from omni_ctl.agent.core import Agent, InstanceSpec, Options, Publisher
from omni_ctl.agent.sinks import ListSink
from omni_ctl.scoring import IngestTarget, PrefixIndex
from omni_ctl.sim.kvcache import prompt_block_hashes
from omni_ctl.sim.kvevents import KVEventPublisher

pytestmark = pytest.mark.timeout(60)

NAME = "127.0.0.1:9"          # the instance's name; no HTTP (metrics/health off)


def free_ports(n, consecutive=False):
    """n free loopback ports (consecutive: a run p, p+1, ...)."""
    for _ in range(200):
        base = random.randrange(20000, 60000)
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + k if consecutive else 0))
                socks.append(s)
            return [s.getsockname()[1] for s in socks]
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def chain(tokens, bs=16, salt=b"s"):
    return prompt_block_hashes(tokens, bs, salt)


def opts(**kw):
    base = dict(block_size=16, metrics_interval=0, health_interval=0,
                flush_interval=0.01, replay_timeout=2.0, settle=100.0, idle_check=1.0)
    base.update(kw)
    return Options(**base)


async def until(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def synced(agent, pubs, inst=0):
    """Wait until the agent has every message of `pubs` (a SUB that joined
    late sees a gap on the next message and replays it) and flushed."""
    streams = agent.instances[inst].streams
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all(st.next == p.seq for st, p in zip(streams, pubs)):
            await agent.flush()
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"agent stuck at {[s.next for s in streams]}, "
                         f"published {[p.seq for p in pubs]}")


class Rig:
    """One publisher per DP rank, the agent, a ListSink and an index fed
    through omni_ingest."""

    def __init__(self, encoding="array", ranks=1, index_bs=16, engine_bs=16,
                 buffer_size=10000, replay_format="vllm", bind=False, **kw):
        self.ports = free_ports(2 * ranks)
        self.pubs = []
        for r in range(ranks):
            connect = f"tcp://127.0.0.1:{self.ports[r]}" if bind else None
            self.pubs.append(KVEventPublisher(
                "127.0.0.1", self.ports[r], self.ports[ranks + r], encoding=encoding,
                block_size=engine_bs, buffer_size=buffer_size, data_parallel_rank=r,
                replay_format=replay_format, connect=connect))
        self.spec = InstanceSpec(NAME, "http://127.0.0.1:9", [
            Publisher(f"tcp://127.0.0.1:{self.ports[r]}",
                      f"tcp://127.0.0.1:{self.ports[ranks + r]}", r) for r in range(ranks)])
        self.sink = ListSink()
        self.agent = Agent([self.spec], self.sink, opts(block_size=index_bs, bind=bind, **kw))
        self.index = PrefixIndex(1, index_bs, 10000)
        self.target = IngestTarget(self.index, {NAME: 0})
        self.applied = 0

    async def __aenter__(self):
        if self.agent.opts.bind:
            await self.agent.start()
            for p in self.pubs:
                p.start()
        else:
            for p in self.pubs:
                p.start()
            await self.agent.start()
        await until(lambda: self.agent.instances[0].mode == "precise", what="catch-up")
        # a PUB drops what it sends before a subscription takes: probe with
        # empty messages until the agent hears one (a later message would
        # reveal the loss as a gap, and the tests count gaps)
        deadline = time.monotonic() + 15
        streams = self.agent.instances[0].streams
        while not all(st.next == p.seq and p.seq > 0 for st, p in zip(streams, self.pubs)):
            assert time.monotonic() < deadline, "subscription never took"
            for st, p in zip(streams, self.pubs):
                if st.next != p.seq or p.seq == 0:
                    p.publish([])
            await asyncio.sleep(0.05)
        for st in streams:
            st.gaps = 0
        return self

    async def __aexit__(self, *exc):
        await self.agent.stop()
        for p in self.pubs:
            await p.stop()

    def apply(self):
        """Feed the index every batch not applied yet."""
        for b in self.sink.batches[self.applied:]:
            self.target.apply(b.encode(), now_us=1)
        self.applied = len(self.sink.batches)
        self.index.check_integrity()

    def match(self, tokens):
        self.apply()
        return self.index.match(tokens, now_us=1)[0]

    def kinds(self):
        return [r[0] for r in self.sink.records(NAME)]


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 50))


# ---- events -> records -> index -------------------------------------------------------

@pytest.mark.parametrize("encoding", ["array", "map"])
def test_stores_removals_clear_reach_the_index(encoding):
    async def main():
        async with Rig(encoding) as rig:
            pub = rig.pubs[0]
            toks = list(range(100, 100 + 64))
            h = chain(toks)
            pub.publish([("stored", h[:2], None, toks[:32])])
            pub.publish([("stored", h[2:], h[1], toks[32:])])
            await synced(rig.agent, rig.pubs)
            stores = rig.sink.records(NAME, B.STORE)
            assert [r[2]["tokens"] for r in stores] == [toks[:32], toks[32:]]
            assert stores[1][2]["anchor"] == h[1] and stores[0][2]["anchor"] is None
            assert rig.match(toks) == 4
            assert rig.match(toks[:40]) == 2
            assert rig.match([1] + toks[1:]) == 0

            pub.publish([("removed", [h[3]])])
            await synced(rig.agent, rig.pubs)
            assert rig.match(toks) == 3
            pub.publish([("cleared",)])
            await synced(rig.agent, rig.pubs)
            assert rig.match(toks) == 0
            assert rig.kinds()[-1] == B.CLEAR
            assert rig.target.instance(0)["mode"] == "precise"
    run(main())


def test_placeholder_foreign_medium_and_unknown_events_are_skipped():
    async def main():
        async with Rig("map") as rig:
            pub = rig.pubs[0]
            toks = list(range(16))
            h = chain(toks)
            # hand-made payload events through the real socket
            import msgpack
            evs = [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                    "token_ids": [], "block_size": 0, "medium": "GPU"},
                   {"type": "BlockStored", "block_hashes": h, "parent_block_hash": None,
                    "token_ids": toks, "block_size": 16, "medium": "CPU"},
                   {"type": "BlockStored", "block_hashes": h, "parent_block_hash": None,
                    "token_ids": toks, "block_size": 16, "group_idx": 1},
                   {"type": "SomethingNew", "x": 1},
                   ["AlsoNew", 1, 2],
                   {"type": "BlockStored", "block_hashes": h, "parent_block_hash": None,
                    "token_ids": toks, "block_size": 16, "future_field": [1, 2]}]
            payload = msgpack.packb([time.time(), evs, None], use_bin_type=True)
            seq = pub.seq
            pub.seq += 1
            pub.buffer.append((seq, payload))
            pub._pub.send_multipart([pub.topic, seq.to_bytes(8, "big"), payload])
            await synced(rig.agent, rig.pubs)
            sk = rig.agent.instances[0].skipped
            assert sk == {"placeholder": 1, "medium": 1, "group": 1, "unknown_type": 2}
            assert len(rig.sink.records(NAME, B.STORE)) == 1
            assert rig.match(toks) == 1
    run(main())


def test_gap_replays_exactly_the_missing_range():
    async def main():
        async with Rig() as rig:
            pub = rig.pubs[0]
            prompts = [list(range(1000 * k, 1000 * k + 32)) for k in range(1, 9)]
            pub.publish([("stored", chain(prompts[0]), None, prompts[0])])
            await synced(rig.agent, rig.pubs)
            first_missing = pub.seq
            pub.drop_next(3)
            for p in prompts[1:]:
                pub.publish([("stored", chain(p), None, p)])
            await synced(rig.agent, rig.pubs)
            st = rig.agent.instances[0].streams[0]
            assert pub.dropped == 3 and st.gaps == 1 and st.resyncs == 0
            first, answered = [r for r in st.replay_log if r[0] >= first_missing][0]
            assert first == first_missing
            assert answered[:3] == [first_missing, first_missing + 1, first_missing + 2]
            # every prompt's store reached the proxy exactly once
            stores = [r[2]["tokens"] for r in rig.sink.records(NAME, B.STORE)]
            assert stores == prompts
            assert all(rig.match(p) == 2 for p in prompts)
            assert rig.agent.instances[0].mode == "precise"
    run(main())


def test_unfillable_gap_clears_goes_approximate_and_recovers():
    async def main():
        async with Rig(buffer_size=2, settle=0.5) as rig:
            pub = rig.pubs[0]
            old = list(range(500, 532))
            pub.publish([("stored", chain(old), None, old)])
            await synced(rig.agent, rig.pubs)
            assert rig.match(old) == 2
            pub.drop_next(4)
            news = [list(range(2000 * k, 2000 * k + 32)) for k in range(1, 7)]
            for p in news:
                pub.publish([("stored", chain(p), None, p)])
            await synced(rig.agent, rig.pubs)
            st = rig.agent.instances[0].streams[0]
            assert st.gaps == 1 and st.resyncs == 1
            rec = rig.sink.records(NAME)
            k = max(i for i, r in enumerate(rec) if r[0] == B.CLEAR)
            assert rec[k + 1][0] == B.STATE and rec[k + 1][2]["mode"] == "approx"
            # what was known before the gap is gone, what came after is there
            assert rig.match(old) == 0
            assert rig.match(news[-1]) == 2
            assert rig.target.instance(0)["mode"] == "approx"
            # gap-free for `settle` seconds: precise again
            await until(lambda: rig.agent.instances[0].mode == "precise", what="settle")
            await rig.agent.flush()
            rig.apply()
            assert rig.target.instance(0)["mode"] == "precise"
            assert rig.target.instance(0)["resyncs"] == 1
    run(main())


def test_engine_clear_ends_approximate_state():
    async def main():
        async with Rig(buffer_size=1) as rig:
            pub = rig.pubs[0]
            pub.drop_next(3)
            for k in range(4):
                p = list(range(300 * k, 300 * k + 16))
                pub.publish([("stored", chain(p), None, p)])
            await synced(rig.agent, rig.pubs)
            assert rig.agent.instances[0].mode == "approx"
            pub.publish([("cleared",)])
            await synced(rig.agent, rig.pubs)
            assert rig.agent.instances[0].mode == "precise"
    run(main())


def test_legacy_replay_framing():
    async def main():
        async with Rig(replay_format="legacy") as rig:
            pub = rig.pubs[0]
            pub.drop_next(2)
            ps = [list(range(70 * k, 70 * k + 16)) for k in range(1, 4)]
            for p in ps:
                pub.publish([("stored", chain(p), None, p)])
            await synced(rig.agent, rig.pubs)
            st = rig.agent.instances[0].streams[0]
            assert st.gaps == 1 and st.resyncs == 0
            assert all(rig.match(p) == 1 for p in ps)
    run(main())


def test_dp_ranks_on_port_offsets():
    """Two ranks publish on port and port + 1 (replay likewise); each has its
    own sequence; both feed the one instance."""
    async def main():
        ports = free_ports(4, consecutive=True)
        pubs = [KVEventPublisher("127.0.0.1", ports[r], ports[2 + r], data_parallel_rank=r)
                for r in range(2)]
        specs = build_specs([NAME], kv_port=ports[0], replay_port=ports[2], dp_ranks=2)
        assert [p.endpoint for p in specs[0].publishers] == [
            f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[1]}"]
        sink = ListSink()
        agent = Agent(specs, sink, opts())
        for p in pubs:
            p.start()
        await agent.start()
        try:
            a, b = list(range(16)), list(range(50, 82))
            pubs[0].publish([("stored", chain(a), None, a)])
            pubs[1].publish([("stored", chain(b), None, b)])
            pubs[1].publish([("removed", chain(b)[1:])])
            await synced(agent, pubs)
            t = IngestTarget(PrefixIndex(1, 16, 100), {NAME: 0})
            for bt in sink.batches:
                t.apply(bt.encode(), now_us=1)
            assert t.index.match(a, now_us=1) == [1]
            assert t.index.match(b, now_us=1) == [1]
            assert [s.next for s in agent.instances[0].streams] == [p.seq for p in pubs]
        finally:
            await agent.stop()
            for p in pubs:
                await p.stop()
    run(main())


def test_agent_binds_and_engine_connects():
    async def main():
        async with Rig(bind=True) as rig:
            p = list(range(16))
            rig.pubs[0].publish([("stored", chain(p), None, p)])
            await synced(rig.agent, rig.pubs)
            assert rig.match(p) == 1
    run(main())


@pytest.mark.parametrize("index_bs,engine_bs", [(64, 16), (16, 32), (8, 16)])
def test_block_size_mapping_through_the_agent(index_bs, engine_bs):
    """Stores cut at engine block boundaries land as whole index blocks."""
    async def main():
        async with Rig(index_bs=index_bs, engine_bs=engine_bs) as rig:
            pub = rig.pubs[0]
            toks = [random.randrange(30000) for _ in range(256)]
            h = chain(toks, engine_bs)
            cuts = [0, 1, 3, 4, 7, len(h)]
            for i, j in zip(cuts, cuts[1:]):
                pub.publish([("stored", h[i:j], h[i - 1] if i else None,
                              toks[i * engine_bs:j * engine_bs])])
            await synced(rig.agent, rig.pubs)
            assert rig.match(toks) == 256 // index_bs
            assert rig.index.match(toks[:100], now_us=1) == [100 // index_bs]
            # the engine evicts the prompt's tail block: the index block
            # holding its last token goes
            pub.publish([("removed", [h[-1]])])
            await synced(rig.agent, rig.pubs)
            tail = engine_bs * (len(h) - 1)
            assert rig.match(toks) == tail // index_bs
    run(main())


def test_push_failure_resynchronises():
    async def main():
        async with Rig(settle=100.0) as rig:
            calls = []

            async def failing(batch):
                calls.append(batch)
                return False
            rig.agent.sink = failing
            p = list(range(16))
            rig.pubs[0].publish([("stored", chain(p), None, p)])
            await until(lambda: calls, what="a push")
            await until(lambda: rig.agent.instances[0].mode == "approx", what="approx")
            assert rig.agent.push_failures >= 1
    run(main())


def test_a_store_after_a_quiet_spell_is_pushed_at_once():
    """A parallel P/D prefill's end reaches the proxy as its last block's
    store: the first record after a quiet spell is pushed at once, not at
    the next tick of the flush period (before: up to a whole period later);
    records that come within the period of that push wait for the next one,
    so pushes stay at most one per period."""
    period = 4.0

    async def main():
        async with Rig(flush_interval=period) as rig:
            pushed = []                     # (monotonic time, batch)
            inner = rig.agent.sink

            async def timed(batch):
                pushed.append((time.monotonic(), batch))
                return await inner(batch)
            rig.agent.sink = timed
            # the catch-up's own pushes: wait out a period after the last
            await asyncio.sleep(period + 0.2)
            quiet_since = pushed[-1][0] if pushed else 0.0
            await asyncio.sleep(max(0.0, quiet_since + period + 0.2 - time.monotonic()))
            n = len(pushed)
            a, b = list(range(16)), list(range(500, 516))
            sent = time.monotonic()
            rig.pubs[0].publish([("stored", chain(a), None, a)])
            await until(lambda: len(pushed) > n, timeout=period, what="the store's push")
            assert pushed[n][0] - sent < period / 4, \
                f"pushed {pushed[n][0] - sent:.2f} s after the store"
            assert [r[2]["tokens"] for r in pushed[n][1].records if r[0] == B.STORE] == [a]
            rig.pubs[0].publish([("stored", chain(b), None, b)])
            await asyncio.sleep(1.0)
            assert len(pushed) == n + 1, "a second push within the period"
            await until(lambda: len(pushed) > n + 1, timeout=2 * period, what="the next push")
            assert pushed[n + 1][0] - pushed[n][0] >= period * 0.9
            assert [r[2]["tokens"] for r in pushed[n + 1][1].records
                    if r[0] == B.STORE] == [b]
    run(main())


def test_two_agents_converge_and_a_late_one_catches_up():
    """Two proxies' agents on one engine end with the same index; the second
    starts after the events and catches up from the replay buffer."""
    async def main():
        async with Rig() as rig:
            pub = rig.pubs[0]
            prompts = [list(range(600 * k, 600 * k + 48)) for k in range(6)]
            for p in prompts:
                pub.publish([("stored", chain(p), None, p)])
            pub.publish([("removed", chain(prompts[2])[1:])])
            await synced(rig.agent, rig.pubs)

            late_sink = ListSink()
            late = Agent([rig.spec], late_sink, opts())
            await late.start()
            try:
                await until(lambda: late.instances[0].mode == "precise", what="late catch-up")
                await synced(late, rig.pubs)
                assert late.instances[0].streams[0].replay_log[0][0] == 0
                ix = PrefixIndex(1, 16, 10000)
                t = IngestTarget(ix, {NAME: 0})
                for b in late_sink.batches:
                    t.apply(b.encode(), now_us=1)
                rig.apply()
                for p in prompts:
                    assert ix.match(p, now_us=1) == rig.index.match(p, now_us=1)
                assert ix.match(prompts[2], now_us=1) == [1]
                assert sorted(ix.lru(0, "precise")) == sorted(rig.index.lru(0, "precise"))
                assert ix.stats()["precise"] == rig.index.stats()["precise"] == 16
            finally:
                await late.stop()
    run(main())


def test_http_push_to_a_loopback_endpoint():
    """--push: batches POSTed to a real loopback HTTP server that applies
    them like the nginx endpoint will (400 on a rejected batch); a failing
    endpoint resynchronises the instance."""
    from aiohttp import web
    from omni_ctl.agent.sinks import HttpSink
    from omni_ctl.scoring.errors import InvalidArgumentError

    async def main():
        target = IngestTarget(PrefixIndex(1, 16, 1000), {NAME: 0})
        fail = {"on": False}

        async def ingest(request):
            if fail["on"]:
                return web.Response(status=503)
            try:
                target.apply(await request.read(), now_us=1)
            except InvalidArgumentError as exc:
                return web.Response(status=400, text=str(exc))
            return web.Response(status=204)
        app = web.Application()
        app.router.add_post("/omni/ingest", ingest)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_ports(1)[0]
        await web.TCPSite(runner, "127.0.0.1", port).start()
        sink = HttpSink(f"http://127.0.0.1:{port}/omni/ingest")
        try:
            rig = Rig()
            rig.agent.sink = sink
            async with rig:
                p = list(range(16 * 3))
                rig.pubs[0].publish([("stored", chain(p), None, p)])
                await synced(rig.agent, rig.pubs)
                await until(lambda: target.index.match(p, now_us=1) == [3], what="POSTed")
                assert target.instance(0)["mode"] == "precise"
                fail["on"] = True
                rig.pubs[0].publish([("removed", chain(p)[2:])])
                await until(lambda: rig.agent.push_failures > 0, what="a failed push")
                fail["on"] = False
                await until(lambda: target.instance(0)["mode"] == "approx",
                            what="approximate after the lost batch")
                # the lost removal is covered: the instance was cleared
                assert target.index.match(p, now_us=1) == [0]
                assert target.stats()["rejected"] == 0
        finally:
            await sink.close()
            await runner.cleanup()
    run(main())


def test_parse_metrics_vllm_dp_and_sglang():
    from omni_ctl.agent.metrics import parse_metrics
    lab = 'model_name="m",engine="{}"'
    text = "\n".join([
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{lab.format(0)}}} 2.0",
        f"vllm:num_requests_running{{{lab.format(1)}}} 3.0",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{lab.format(0)}}} 1.0",
        f"vllm:num_requests_waiting{{{lab.format(1)}}} 0.0",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{lab.format(0)}}} 0.2",
        f"vllm:kv_cache_usage_perc{{{lab.format(1)}}} 0.4",
        "# TYPE vllm:cache_config_info gauge",
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000",engine="0"} 1.0',
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="500",engine="1"} 1.0', ""])
    m = parse_metrics(text)
    assert (m.engine, m.running, m.waiting) == ("vllm", 5, 1)
    assert abs(m.kv_usage - 0.3) < 1e-9 and m.capacity_tokens == 1500 * 16
    m = parse_metrics("# TYPE sglang:num_running_reqs gauge\n"
                      'sglang:num_running_reqs{model_name="m"} 4.0\n'
                      "# TYPE sglang:num_queue_reqs gauge\n"
                      'sglang:num_queue_reqs{model_name="m"} 7.0\n'
                      "# TYPE sglang:token_usage gauge\n"
                      'sglang:token_usage{model_name="m"} 0.5\n')
    assert (m.engine, m.running, m.waiting, m.kv_usage, m.capacity_tokens) == (
        "sglang", 4, 7, 0.5, None)
    with pytest.raises(ValueError):
        parse_metrics("this is { not prometheus")


def test_lost_last_message_is_found_by_the_idle_check():
    """A dropped message with nothing after it shows no gap; after
    `idle_check` quiet seconds the agent asks the replay endpoint."""
    async def main():
        async with Rig() as rig:
            p = list(range(16 * 2))
            rig.pubs[0].drop_next(1)
            rig.pubs[0].publish([("stored", chain(p), None, p)])
            await synced(rig.agent, rig.pubs)
            st = rig.agent.instances[0].streams[0]
            assert rig.pubs[0].dropped == 1 and st.gaps == 1 and st.resyncs == 0
            assert rig.match(p) == 2
    run(main())


def test_publisher_restart_numbers_from_zero_again():
    """An engine restarted: its numbers start at 0 again and its cache is
    empty; the agent clears the instance instead of ignoring the 'old'
    numbers as duplicates."""
    async def main():
        async with Rig() as rig:
            old = list(range(16 * 2))
            rig.pubs[0].publish([("stored", chain(old), None, old)])
            for _ in range(5):
                rig.pubs[0].publish([])
            await synced(rig.agent, rig.pubs)
            assert rig.match(old) == 2
            await rig.pubs[0].stop()
            rig.pubs[0] = KVEventPublisher("127.0.0.1", rig.ports[0], rig.ports[1])
            rig.pubs[0].start()
            st = rig.agent.instances[0].streams[0]
            deadline = time.monotonic() + 15
            while st.restarts == 0:
                assert time.monotonic() < deadline, "restart never seen"
                rig.pubs[0].publish([])
                await asyncio.sleep(0.05)
            new = list(range(100, 100 + 16 * 3))
            rig.pubs[0].publish([("stored", chain(new), None, new)])
            await synced(rig.agent, rig.pubs)
            assert st.restarts == 1 and st.resyncs == 0
            assert rig.match(old) == 0 and rig.match(new) == 3
            assert rig.agent.instances[0].mode == "precise"
    run(main())
