"""Scenario 8, bad input reaching the running proxy: garbage VIPs from NSP, malformed NSM
requests on its endpoint socket. The proxy refuses each bad value with a clear reason (a
logged and skipped VIP; a gRPC error status, logged), without a traceback; it keeps running and
SERVING, the kernel and IPAM get nothing from the bad input, and the targets' traffic flows.

* VIPs: the NSP configuration file the lab serves gets garbage entries (the lab NSP passes VIP
  strings through verbatim) next to good new ones: each bad value is logged once (WARNING
  "vip rejected", with its reason), also when the list comes again; the good VIPs get their
  rules and the old ones stay; with the file restored the good ones go again.
* NSM: grpcio sends malformed Requests straight to the proxy's endpoint socket: each gets
  INVALID_ARGUMENT with the reason, logged ("target request refused"); bytes that do not parse
  get INTERNAL, as grpc-go and grpcio answer them. Two things are not errors, by design: a
  request without labels (labels only steer NSM's choice of endpoint) is served, and Close is
  idempotent as in NSM (an unknown connection: OK), but a Close naming a live target's key
  under an id that is not its connection's is ignored rather than cutting that target off.
  Afterwards the bridge ports, interfaces, rules, addresses and IPAM records are as before.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message

from proxy.api.networkservice.connection_pb2 import Connection, Mechanism, PathSegment
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.lab.scenarios import stream_set
from proxy.lab.state import leftovers
from proxy.lab.topology import NODE, PROXY_SERVICE, TRENCH, Topology
from tests.e2e.conftest import spec
from tests.e2e.inventory import expected_vips, inventory, key_records, target_key

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture
async def topology(state_dir: Path) -> AsyncIterator[Topology]:
    """The default lab in its quick mode (plain text): the malformed requests come from grpcio
    straight to the endpoint socket, with no SVID of the lab's (mutual TLS refusing a client is
    tests/integration/test_identity.py's business)."""
    async with Topology.running(spec(state_dir, secure=False)) as running:
        yield running
    assert leftovers(running.state) == []


RELEASE_DELAY = 1.0  # NSM_IP_RELEASE_DELAY in the lab
SETTLE = 10.0  # NSP polls its file every 0.5 s; the proxy reconciles at once

# Each bad VIP value, with what the proxy's reason must say.
BAD_VIPS = {
    "not-an-ip": "not an IP address or CIDR prefix",
    "300.1.2.3/32": "not an IP address or CIDR prefix",
    "": "empty",
    "198.19.9.9/40": "prefix length 40 is longer than IPv4 allows",
    "2001:db8:ff::zz/128": "not an IP address or CIDR prefix",
    "198.19.0.1/24": "host bits set: the prefix would be 198.19.0.0/24",
    "2001:db8:ff::1/64": "host bits set: the prefix would be 2001:db8:ff::/64",
    " 198.19.5.5/32": "not an IP address or CIDR prefix",
    "198.19.5.5/255.255.255.255": "not an IP address or CIDR prefix",
    "0.0.0.0/0": "the default prefix",
    "::/0": "the default prefix",
    "127.0.0.1/32": "loopback",
    "fe80::1/128": "link-local",
    "224.0.0.1/32": "multicast",
    "::ffff:198.19.1.1/128": "IPv4-mapped",
    "9" * 300: "not an IP address or CIDR prefix",
}
GOOD_VIPS = ["198.19.7.7/32", "2001:db8:ff::77/128"]
LATER_VIP = "198.19.7.8/32"  # added while the bad ones stay: they must not be logged again


def proxy_log_since(topology: Topology, offset: int) -> str:
    with open(topology.directory / "proxy.log", "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def log_size(topology: Topology) -> int:
    return (topology.directory / "proxy.log").stat().st_size


def write_atomically(path: Path, text: str) -> None:
    """As the topology writes it: the NSP never reads half a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def wait_rules(topology: Topology, wanted: set[str], what: str) -> None:
    async def there() -> bool:
        return {rule["src"] for rule in await topology.vip_rules()} == wanted

    await topology.wait_until(what, there, SETTLE, watch=("proxy",))


async def traffic_flows(topology: Topology) -> None:
    """A second of a stream from each target's VIP of each family: nothing lost."""
    async with stream_set(topology, per_family=1) as streams:
        await trio.sleep(1.0)
    for stream, report in streams.reports().items():
        print(f"  tg{stream.target} IPv{stream.version}: {report}")
        assert report.lost == 0 and report.received > 0, report


async def check_healthy(topology: Topology, since: int) -> None:
    assert topology.is_running("proxy")
    health = await topology.health()
    print(f"proxy health: {health}")
    assert set(health.values()) == {"SERVING"}, health
    log = proxy_log_since(topology, since)
    assert "Traceback" not in log and "handler failed" not in log, log[-3000:]


async def test_garbage_vips_are_skipped_one_by_one(topology: Topology) -> None:
    config_path = topology.directory / "nsp.json"
    original = config_path.read_text()
    config = json.loads(original)
    before = expected_vips(topology)
    assert {rule["src"] for rule in await topology.vip_rules()} == before
    offset = log_size(topology)

    def entry(name: str, address: str) -> dict[str, str]:
        return {"name": name, "address": address, "trench": TRENCH}

    bad = [entry(f"bad-{n}", value) for n, value in enumerate(BAD_VIPS)]
    good = [entry(f"good-{n}", value) for n, value in enumerate(GOOD_VIPS)]
    config["vips"] += bad + good
    write_atomically(config_path, json.dumps(config, indent=2))
    started = trio.current_time()
    with_good = before | {vip.split("/")[0] for vip in GOOD_VIPS}
    await wait_rules(topology, with_good, "the good VIPs' rules, next to the old ones")
    print(
        f"{len(BAD_VIPS)} bad and {len(GOOD_VIPS)} good VIPs added: the good ones' rules in"
        f" {trio.current_time() - started:.2f}s"
    )
    config["vips"].append(entry("good-later", LATER_VIP))
    write_atomically(config_path, json.dumps(config, indent=2))
    await wait_rules(topology, with_good | {LATER_VIP.split("/")[0]}, "the later VIP's rule")

    log = proxy_log_since(topology, offset)
    rejected = [line for line in log.splitlines() if " vip rejected " in line]
    print(f"'vip rejected' lines: {len(rejected)} for {len(BAD_VIPS)} bad values, e.g.:")
    for line in rejected[:4]:
        print(f"  {line[:200]}")
    for item in bad:
        lines = [line for line in rejected if f" vip={item['name']} " in line]
        assert len(lines) == 1, (item, lines)  # once, though the list came twice
        assert "WARNING" in lines[0] and BAD_VIPS[item["address"]] in lines[0], lines[0]
        assert repr(item["address"][:40])[:-1] in lines[0], lines[0]
    await check_healthy(topology, offset)
    await traffic_flows(topology)

    write_atomically(config_path, original)
    started = trio.current_time()
    await wait_rules(topology, before, "the original VIP rules only")
    print(f"original file back: the added rules gone in {trio.current_time() - started:.2f}s")
    await check_healthy(topology, offset)


# -- malformed NSM requests ------------------------------------------------------------------------


@attrs.frozen
class Answer:
    code: str  # a grpc.StatusCode name, OK when the call succeeded
    details: str
    reply: Any = None


def request(name: str = "odd") -> NetworkServiceRequest:
    """A target's first request as it reaches the proxy, here straight from the test: its own
    path segment only (NSM's manager would have added its own)."""
    conn_id = target_key(name)
    connection = Connection(
        id=conn_id, network_service=PROXY_SERVICE, payload="ETHERNET", labels={"nodeName": NODE}
    )
    connection.path.path_segments.append(PathSegment(name=name, id=conn_id))
    return NetworkServiceRequest(
        connection=connection, mechanism_preferences=[Mechanism(cls="LOCAL", type="KERNEL")]
    )


def serialize(message: Message | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


@contextmanager
def endpoint_channel(topology: Topology) -> Iterator[grpc.Channel]:
    """grpcio to the proxy's endpoint socket, /tmp/<NSM_NAME>-*/listen.on (the topology notes
    the directory when it is up)."""
    sockets = [
        Path(path) / "listen.on"
        for path in topology.state.paths
        if Path(path).name.startswith(f"{topology.proxy_name}-")
    ]
    live = [path for path in sockets if path.exists()]
    assert len(live) == 1, sockets
    channel = grpc.insecure_channel(f"unix://{live[0]}")
    try:
        yield channel
    finally:
        channel.close()


def call(channel: grpc.Channel, method: str, message: Message | bytes) -> Answer:
    reply_type = Connection if method == "Request" else Empty
    stub = channel.unary_unary(
        f"/networkservice.NetworkService/{method}",
        request_serializer=serialize,
        response_deserializer=reply_type.FromString,
    )
    try:
        reply = stub(message, timeout=10)
    except grpc.RpcError as exc:
        return Answer(exc.code().name, exc.details() or "")
    return Answer("OK", "", reply)


def refused_requests() -> dict[str, tuple[NetworkServiceRequest | bytes, str]]:
    """Requests the proxy must refuse with INVALID_ARGUMENT: label -> (request, what the
    status message says)."""
    cases: dict[str, tuple[NetworkServiceRequest | bytes, str]] = {}

    def case(label: str, expected: str) -> NetworkServiceRequest:
        message = request()
        cases[label] = (message, expected)
        return message

    cases["no connection"] = (NetworkServiceRequest(), "the request has no connection")
    case("no mechanism preferences", "no supported mechanism (offered: none;").ClearField(
        "mechanism_preferences"
    )
    unknown = case("an unknown mechanism type", "no supported mechanism (offered: MEMIF;")
    unknown.mechanism_preferences[0].type = "MEMIF"
    chosen = case("an unknown mechanism chosen", "mechanism 'VFIO' is not supported")
    chosen.connection.mechanism.type = "VFIO"
    case("no network service", "names no network service").connection.network_service = ""
    other = case("another network service", "'proxy.conduit-b.trench-a.red' is not served here")
    other.connection.network_service = "proxy.conduit-b.trench-a.red"
    garbage = case(
        "addresses that are not addresses",
        "bad IP context: src_ip_addrs[0] 'not-an-ip' is not an address/length;"
        " dst_ip_addrs[0] '300.1.2.3/32' is not an address/length;"
        " extra_prefixes[0] '2001:db8:ff::zz/64' is not an address/length;"
        " policies[0].from 'everywhere' is not an address/length",
    ).connection.context.ip_context
    garbage.src_ip_addrs.append("not-an-ip")
    garbage.dst_ip_addrs.append("300.1.2.3/32")
    garbage.extra_prefixes.append("2001:db8:ff::zz/64")
    setattr(garbage.policies.add(), "from", "everywhere")
    case("an empty path", "the connection has no path").connection.path.ClearField("path_segments")
    beyond = case("a path index beyond the path", "path index 3 is beyond its 1 segments")
    beyond.connection.path.index = 3
    case("an id not the segment's", "is not the id of path segment 0").connection.id = "another"
    case("no id", "the connection has no id").connection.id = ""
    keyless = case("a first segment without id", "path segment 0 has no id").connection
    keyless.path.path_segments[0].id = ""
    keyless.path.path_segments.add(name="nsmgr", id=keyless.id)
    keyless.path.index = 1
    # Valid protobuf, but only a field this message does not have: an empty request.
    cases["bytes of an unknown field"] = (b"\xf8\x07\x01", "the request has no connection")
    return cases


async def test_malformed_nsm_requests_are_refused_clearly(topology: Topology) -> None:
    before = await inventory(topology)
    offset = log_size(topology)
    garbage = b"\xff" * 8 + os.urandom(56)  # wire type 7 does not exist: never parses
    for kind in (NetworkServiceRequest, Connection):
        with pytest.raises(DecodeError):
            kind.FromString(garbage)
    answers: dict[str, Answer] = {}
    with endpoint_channel(topology) as channel:

        async def ask(label: str, method: str, message: Message | bytes) -> Answer:
            answers[label] = await trio.to_thread.run_sync(call, channel, method, message)
            return answers[label]

        refused = refused_requests()
        for label, (message, _) in refused.items():
            await ask(label, "Request", message)
        await ask("random bytes as a Request", "Request", garbage)
        await ask("random bytes as a Close", "Close", garbage)

        # Labels only steer NSM's choice of endpoint: a request without any is served.
        unlabelled = request("unlabelled")
        unlabelled.connection.labels.clear()
        accepted = await ask("no labels (accepted)", "Request", unlabelled)
        assert accepted.code == "OK", accepted
        held = set((await inventory(topology)).records) - set(before.records)
        assert held == key_records(target_key("unlabelled"), topology.families), held
        await ask("Close of the unlabelled one", "Close", accepted.reply)

        # NSM's Close is idempotent: one for a connection nobody knows succeeds, changing
        # nothing; nor may one that names a live target's key under an id not its own.
        ghost = request("ghost").connection
        ghost.path.path_segments.add(name=topology.proxy_name, id="no-such-connection")
        await ask("Close of an unknown connection", "Close", ghost)
        forged = request("tg0").connection
        forged.mechanism.type = "KERNEL"
        await ask("Close naming tg0's key, not its id", "Close", forged)
        nameless = Connection(network_service=PROXY_SERVICE)
        nameless.path.path_segments.add(name="nobody")
        await ask("Close without any id", "Close", nameless)

    width = max(len(label) for label in answers)
    for label, answer in answers.items():
        print(f"  {label:<{width}}  {answer.code:<16} {answer.details[:110]}")
    for label, (_, expected) in refused.items():
        answer = answers[label]
        assert answer.code == "INVALID_ARGUMENT" and expected in answer.details, (label, answer)
    # gRPC's own convention for a request that does not parse (grpc-go, grpcio): INTERNAL.
    for method, type_name in (("Request", "NetworkServiceRequest"), ("Close", "Connection")):
        answer = answers[f"random bytes as a {method}"]
        assert answer.code == "INTERNAL", answer
        assert answer.details.startswith(f"could not parse {type_name}: "), answer
    for label in answers:
        if label.startswith("Close") or label.startswith("no labels"):
            assert answers[label].code == "OK", (label, answers[label])

    log = proxy_log_since(topology, offset)
    refusals = re.findall(r"target request refused .*", log)
    unparsed = re.findall(r"request refused method=/networkservice.NetworkService/\w+ .*", log)
    print(f"proxy log: {len(refusals)} 'target request refused', {len(unparsed)} unparsable")
    assert len(refusals) == len(refused), refusals
    for (label, (_, expected)), line in zip(refused.items(), refusals, strict=True):
        assert expected.split(":")[0] in line, (label, line)
    assert len(unparsed) == 2, unparsed
    ignored = re.findall(r"close of an unknown connection ignored: its key is in use .*", log)
    assert len(ignored) == 1 and f"key={target_key('tg0')}" in ignored[0], ignored

    # Nothing of any of it is left: ports, interfaces, IPAM records, as before.
    await trio.sleep(RELEASE_DELAY + 0.5)
    last = await inventory(topology)

    async def as_before() -> bool:
        nonlocal last
        last = await inventory(topology)
        return last.records == before.records

    try:
        await topology.wait_until("IPAM records as before", as_before, SETTLE)
    except Exception:
        print("records now:", sorted(set(last.records) ^ set(before.records)))
        raise
    after = await inventory(topology)
    print(
        f"after: {len(after.ports)} bridge ports, {len(after.links)} interfaces,"
        f" {len(after.records)} IPAM records (before: {len(before.ports)}, {len(before.links)},"
        f" {len(before.records)})"
    )
    assert after.ports == before.ports and after.links == before.links
    assert after.rules == before.rules and after.addresses == before.addresses
    await check_healthy(topology, offset)
    await traffic_flows(topology)
