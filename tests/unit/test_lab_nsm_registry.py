"""The lab NSM registry's decisions (query matching, registration stamps, expiry) and its task
(a slow watcher is dropped, never waited for), without sockets."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger
from purerpc.grpclib.exceptions import ResourceExhaustedError

from proxy.api.registry.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceLabels,
)
from proxy.lab.nsm.registry import (
    Mailbox,
    NetworkServiceEndpointRegistryServicer,
    Overflow,
    Registry,
    WallClock,
    deliver,
    expired,
    is_unregister_marker,
    next_expiry,
    ns_matches,
    nse_matches,
    stamp_registration,
)
from proxy.nsm.wire import seconds, timestamp
from proxy.rpc import CallContext, Peer

SERVICE = "conduit-a.trench-a.default"


def nse(name: str = "lb-a", **fields: object) -> NetworkServiceEndpoint:
    base = NetworkServiceEndpoint(
        name=name,
        network_service_names=[SERVICE, "other"],
        network_service_labels={
            SERVICE: NetworkServiceLabels(labels={"nodeName": "node-a", "zone": "z1"})
        },
        url="unix:///tmp/lb-a/listen.on",
    )
    base.MergeFrom(NetworkServiceEndpoint(**fields))  # type: ignore[arg-type]
    return base


def labels(service: str, **values: str) -> dict[str, NetworkServiceLabels]:
    return {service: NetworkServiceLabels(labels=values)}


# -- matching -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "matches"),
    [
        (NetworkServiceEndpoint(), True),
        (NetworkServiceEndpoint(name="lb-a"), True),
        (NetworkServiceEndpoint(name="lb"), False),  # exact, not a substring
        (NetworkServiceEndpoint(network_service_names=[SERVICE]), True),
        (NetworkServiceEndpoint(network_service_names=["other", SERVICE]), True),
        (NetworkServiceEndpoint(network_service_names=[SERVICE, "third"]), False),
        (NetworkServiceEndpoint(network_service_labels=labels(SERVICE, nodeName="node-a")), True),
        (NetworkServiceEndpoint(network_service_labels=labels(SERVICE)), True),
        (NetworkServiceEndpoint(network_service_labels=labels(SERVICE, nodeName="node-b")), False),
        (NetworkServiceEndpoint(network_service_labels=labels(SERVICE, rack="r1")), False),
        (NetworkServiceEndpoint(network_service_labels=labels("other")), False),  # no entry
        (NetworkServiceEndpoint(url="lb-a/listen"), True),
        (NetworkServiceEndpoint(url="lb-b"), False),
    ],
)
def test_nse_query_matching(query: NetworkServiceEndpoint, matches: bool) -> None:
    assert nse_matches(query, nse()) is matches


def test_nse_query_matching_compares_expiration_seconds_when_set() -> None:
    stored = nse(expiration_time=timestamp(1000.5))
    assert nse_matches(NetworkServiceEndpoint(expiration_time=timestamp(1000.9)), stored)
    assert not nse_matches(NetworkServiceEndpoint(expiration_time=timestamp(1001)), stored)


def test_a_query_does_not_add_label_entries_to_the_stored_record() -> None:
    stored = nse()
    nse_matches(NetworkServiceEndpoint(network_service_labels=labels("absent")), stored)
    assert "absent" not in stored.network_service_labels


@given(
    names=st.lists(st.sampled_from(["a", "b", "c", "d"]), unique=True),
    wanted=st.lists(st.sampled_from(["a", "b", "c", "d"]), unique=True),
)
def test_service_names_match_as_a_subset(names: list[str], wanted: list[str]) -> None:
    stored = NetworkServiceEndpoint(name="x", network_service_names=names)
    query = NetworkServiceEndpoint(network_service_names=wanted)
    assert nse_matches(query, stored) is set(wanted).issubset(names)


def test_ns_query_matching() -> None:
    ns = NetworkService(name="proxy.a", payload="ETHERNET")
    assert ns_matches(NetworkService(), ns)
    assert ns_matches(NetworkService(name="proxy.a"), ns)
    assert not ns_matches(NetworkService(name="proxy"), ns)
    assert ns_matches(NetworkService(payload="ETHERNET"), ns)
    assert not ns_matches(NetworkService(name="proxy.a", payload="IP"), ns)


# -- registration and expiry ----------------------------------------------------------------------


def test_stamp_keeps_the_expiration_sent_and_fills_the_first_registration_time() -> None:
    stored = stamp_registration(nse(expiration_time=timestamp(5000)), None, 1000.25, 60)
    assert seconds(stored.expiration_time) == 5000
    assert seconds(stored.initial_registration_time) == 1000.25


def test_stamp_without_expiration_uses_the_default_lifetime() -> None:
    stored = stamp_registration(nse(), None, 1000.0, 60)
    assert seconds(stored.expiration_time) == 1060


def test_a_refresh_keeps_the_initial_registration_time() -> None:
    first = stamp_registration(nse(), None, 1000.0, 60)
    again = stamp_registration(nse(), first, 1040.0, 60)
    assert seconds(again.initial_registration_time) == 1000
    assert seconds(again.expiration_time) == 1100


def test_the_stamp_does_not_change_the_request() -> None:
    sent = nse()
    stamp_registration(sent, None, 1000.0, 60)
    assert not sent.HasField("expiration_time")


def test_the_minus_one_marker() -> None:
    assert is_unregister_marker(nse(expiration_time={"seconds": -1}))
    assert not is_unregister_marker(nse(expiration_time={"seconds": 0, "nanos": 1}))
    assert not is_unregister_marker(nse())


def test_expired_and_next_expiry() -> None:
    records = [
        nse("a", expiration_time=timestamp(100)),
        nse("b", expiration_time=timestamp(200)),
        nse("c"),  # never
    ]
    assert expired(records, 99.9) == []
    assert expired(records, 100) == ["a"]
    assert expired(records, 250) == ["a", "b"]
    assert next_expiry(records) == 100
    assert next_expiry(records[2:]) == math.inf


# -- fan-out --------------------------------------------------------------------------------------


async def test_deliver_drops_a_full_subscriber_with_an_overflow_marker() -> None:
    send, receive = trio.open_memory_channel[object](3)
    assert deliver(send, 1) and deliver(send, 2)
    assert not deliver(send, 3)  # the last slot holds the marker
    assert [receive.receive_nowait() for _ in range(3)] == [1, 2, Overflow(2)]
    with pytest.raises(trio.EndOfChannel):
        receive.receive_nowait()


async def test_deliver_to_a_subscriber_gone_is_false() -> None:
    send, receive = trio.open_memory_channel[object](3)
    receive.close()
    assert not deliver(send, 1)


async def test_a_mailbox_job_failure_is_raised_in_the_asker() -> None:
    mailbox = Mailbox()

    def fails() -> None:
        raise KeyError("nope")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mailbox.serve)
        assert await mailbox.ask(lambda: 42) == 42
        with pytest.raises(KeyError):
            await mailbox.ask(fails)
        assert await mailbox.ask(lambda: "still serving") == "still serving"
        nursery.cancel_scope.cancel()


async def test_a_slow_watcher_is_dropped_and_never_blocks_the_registry(
    mock_clock: trio.testing.MockClock,
) -> None:
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        async with trio.open_nursery() as nursery:
            registry = Registry(WallClock(start=1000.0), watch_buffer=4)
            await nursery.start(registry.run)
            query = NetworkServiceEndpoint(network_service_names=[SERVICE])
            _, slow = await registry.find_endpoints(query, watch=True, who="slow")
            _, keen = await registry.find_endpoints(query, watch=True, who="keen")
            assert slow is not None and keen is not None
            received = []
            for i in range(10):  # no time passes: the registry never waits for "slow"
                await registry.register_endpoint(nse(f"lb-{i}"))
                received.append(keen.receive_nowait())
            assert [c.item.name for c in received] == [f"lb-{i}" for i in range(10)]
            backlog = [slow.receive_nowait() for _ in range(4)]
            assert backlog[:3] == received[:3]
            assert not any(change.deleted for change in backlog[:3])
            assert backlog[3] == Overflow(3)
            with pytest.raises(trio.EndOfChannel):
                slow.receive_nowait()
            assert warnings == ["watcher too slow, its Find stream is dropped"]
            nursery.cancel_scope.cancel()
    finally:
        logger.remove(sink)


async def test_a_dropped_watch_stream_ends_with_resource_exhausted(
    mock_clock: trio.testing.MockClock,
) -> None:
    context = CallContext(
        service_name="registry.NetworkServiceEndpointRegistry",
        method_name="Find",
        custom_metadata=(),
        peer=Peer(address="unix:/tmp/nsm.sock", pid=4242),
        deadline=math.inf,
    )
    async with trio.open_nursery() as nursery:
        registry = Registry(WallClock(start=1000.0), watch_buffer=3)
        await nursery.start(registry.run)
        await registry.register_endpoint(nse("lb-0"))
        servicer = NetworkServiceEndpointRegistryServicer(registry)
        query = NetworkServiceEndpointQuery(
            network_service_endpoint=NetworkServiceEndpoint(), watch=True
        )
        stream = servicer.Find(query, context)
        first = await stream.__anext__()  # subscribed: the initial list
        assert first.network_service_endpoint.name == "lb-0" and not first.deleted
        for i in range(1, 5):
            await registry.register_endpoint(nse(f"lb-{i}"))
        names = [(await stream.__anext__()).network_service_endpoint.name for _ in range(2)]
        assert names == ["lb-1", "lb-2"]
        with pytest.raises(ResourceExhaustedError, match="fell 2 changes behind"):
            await stream.__anext__()
        await stream.aclose()
        nursery.cancel_scope.cancel()
