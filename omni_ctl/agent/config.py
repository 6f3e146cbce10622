"""Which instances the agent listens to, and where their publishers are.

From the nginx config the proxy runs (`omni-ctl gen-conf` output): every
`server` line of an upstream with `omni_balance`, and `omni_block_size`; or
from explicit `--instance` options.  KV-event publishers per instance: an
explicit endpoint (`--kv-endpoint ADDR=ENDPOINT[,REPLAY]`, repeatable for DP
ranks), or host + a port (`--kv-events-port`, same on every host) or the
instance's port + an offset (`--kv-events-port-offset`), with DP rank r on
port + r (`--dp-ranks`).
"""

import re

from .core import InstanceSpec, Publisher


class AgentConfigError(ValueError):
    def __init__(self, option, message):
        super().__init__(f"{option}: {message}")
        self.option = option


def _tokens(text):
    """nginx config text -> tokens ('{', '}', ';' and words), comments out."""
    text = re.sub(r"#[^\n]*", "", text)
    return re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};]+', text)


def read_nginx_conf(text):
    """(instances, block_size): the `server` addresses of the upstreams with
    `omni_balance` in file order without repeats, and `omni_block_size`
    (None when absent)."""
    toks = _tokens(text)
    stack, stmt = [], []
    upstreams = []          # [(balanced, [addresses])]
    block_size = None
    for t in toks:
        if t == "{":
            stack.append(stmt[:2])
            if stmt and stmt[0] == "upstream":
                upstreams.append([False, []])
            stmt = []
        elif t == "}":
            if not stack:
                raise AgentConfigError("--conf", "unbalanced '}'")
            if stack.pop()[:1] == ["upstream"]:
                pass
            stmt = []
        elif t == ";":
            in_upstream = bool(stack) and stack[-1][:1] == ["upstream"]
            if stmt and in_upstream and upstreams:
                if stmt[0] == "omni_balance":
                    upstreams[-1][0] = True
                elif stmt[0] == "server" and len(stmt) > 1:
                    upstreams[-1][1].append(stmt[1])
            elif stmt and stmt[0] == "omni_block_size" and len(stmt) > 1:
                try:
                    block_size = int(stmt[1])
                except ValueError:
                    raise AgentConfigError("--conf", f"omni_block_size {stmt[1]!r}") from None
            stmt = []
        else:
            stmt.append(t.strip("\"'"))
    if stack:
        raise AgentConfigError("--conf", "unbalanced '{'")
    out = []
    for balanced, servers in upstreams:
        if balanced:
            out += [s for s in servers if s not in out]
    return out, block_size


def ingest_key(text):
    """The bearer key nginx requires at the location with `omni_ingest`:
    ("file", PATH) for `omni_api_key_file`, ("key", KEY) for `omni_api_key`,
    None when none is required (none set, or `omni_api_key off`).  The
    nearest block's wins, as nginx inherits them into inner blocks."""
    stack, stmt = [{}], []
    for t in _tokens(text):
        if t == "{":
            stack.append({})
            stmt = []
        elif t == "}":
            if len(stack) < 2:
                raise AgentConfigError("--conf", "unbalanced '}'")
            block = stack.pop()
            if "ingest" in block:
                return next((b["key"] for b in (block, *reversed(stack)) if "key" in b),
                            None)
            stmt = []
        elif t == ";":
            if stmt[:1] == ["omni_api_key_file"] and len(stmt) > 1:
                stack[-1]["key"] = ("file", stmt[1])
            elif stmt[:1] == ["omni_api_key"] and len(stmt) > 1:
                stack[-1]["key"] = None if stmt[1] == "off" else ("key", stmt[1])
            elif stmt == ["omni_ingest"]:
                stack[-1]["ingest"] = True
            stmt = []
        else:
            stmt.append(t.strip("\"'"))
    return None


def _split_addr(addr):
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise AgentConfigError("--instance", f"{addr!r} is not host:port")
    return host.strip("[]"), int(port)


def build_specs(addresses, *, kv_endpoints=(), kv_port=None, replay_port=None,
                kv_port_offset=None, replay_port_offset=None, dp_ranks=1):
    """InstanceSpec per address.  kv_endpoints: ["ADDR=ENDPOINT[,REPLAY]"]."""
    if dp_ranks < 1:
        raise AgentConfigError("--dp-ranks", f"must be >= 1, got {dp_ranks}")
    explicit = {}
    for item in kv_endpoints:
        addr, sep, rest = item.partition("=")
        if not sep or not rest:
            raise AgentConfigError("--kv-endpoint", f"{item!r}: expected ADDR=ENDPOINT[,REPLAY]")
        ep, _, rep = rest.partition(",")
        explicit.setdefault(addr, []).append((ep, rep or None))
    unknown = set(explicit) - set(addresses)
    if unknown:
        raise AgentConfigError("--kv-endpoint", f"not an instance: {', '.join(sorted(unknown))}")
    if kv_port is not None and kv_port_offset is not None:
        raise AgentConfigError("--kv-events-port", "give a port or an offset, not both")
    specs = []
    for addr in addresses:
        host, port = _split_addr(addr)
        pubs = []
        if addr in explicit:
            pubs = [Publisher(ep, rep, r) for r, (ep, rep) in enumerate(explicit[addr])]
        elif kv_port is not None or kv_port_offset is not None:
            base = kv_port if kv_port is not None else port + kv_port_offset
            rbase = (replay_port if replay_port is not None else
                     port + replay_port_offset if replay_port_offset is not None else None)
            for r in range(dp_ranks):
                pubs.append(Publisher(f"tcp://{host}:{base + r}",
                                      None if rbase is None else f"tcp://{host}:{rbase + r}", r))
        specs.append(InstanceSpec(addr, f"http://{host}:{port}", pubs))
    return specs
