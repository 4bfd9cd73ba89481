"""Decisions of the proxy's NSM client side: registration, discovery and the mesh (pure)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from proxy.api.networkservice.connection_pb2 import (
    Connection,
    ConnectionEvent,
    ConnectionEventType,
    PathSegment,
)
from proxy.api.registry.registry_pb2 import NetworkServiceEndpoint, NetworkServiceEndpointResponse
from proxy.nsm.discovery import evictable, is_alive
from proxy.nsm.mesh import (
    MeshSettings,
    connection_id,
    lb_addresses,
    recoverable,
    refresh_in,
    time_left,
)
from proxy.nsm.registration import endpoint, network_service, refresh_after
from proxy.nsm.wire import interface_name, seconds, timestamp

SETTINGS = MeshSettings("proxy-a", "conduit-a.trench-a.red", 1500, 15.0, 5.0, 600.0)


def stamp(seconds: float) -> Timestamp:
    value = Timestamp()
    value.seconds = int(seconds)
    return value


def test_network_service_routes_targets_to_the_proxy_of_their_node() -> None:
    service = network_service("proxy.c.t.ns")
    assert service.payload == "ETHERNET"
    [match] = service.matches
    assert dict(match.source_selector) == {"nodeName": "{{.nodeName}}"}
    assert dict(match.routes[0].destination_selector) == {"nodeName": "{{.nodeName}}"}


def test_endpoint_carries_the_node_label_and_url() -> None:
    nse = endpoint("proxy-a", "proxy.c.t.ns", "node-a", "unix:///tmp/x/listen.on", 100.0)
    assert list(nse.network_service_names) == ["proxy.c.t.ns"]
    assert dict(nse.network_service_labels["proxy.c.t.ns"].labels) == {"nodeName": "node-a"}
    assert nse.expiration_time.seconds == 100


def test_registration_refreshes_at_two_thirds_of_the_lifetime_left() -> None:
    assert refresh_after(stamp(160), now=100) == 40
    assert refresh_after(stamp(90), now=100) == 0.2  # already late: at once, not never


def test_discovery_follows_upstreams_liveness_rule() -> None:
    alive = NetworkServiceEndpointResponse(
        network_service_endpoint=NetworkServiceEndpoint(name="lb", expiration_time=stamp(10))
    )
    assert is_alive(alive)
    deleted = NetworkServiceEndpointResponse()
    deleted.CopyFrom(alive)
    deleted.deleted = True
    assert not is_alive(deleted)
    marker = NetworkServiceEndpointResponse()
    marker.CopyFrom(alive)
    marker.network_service_endpoint.expiration_time.seconds = -1
    assert not is_alive(marker)
    no_expiry = NetworkServiceEndpointResponse(
        network_service_endpoint=NetworkServiceEndpoint(name="lb")
    )
    assert not is_alive(no_expiry)


def test_discovery_evicts_after_expiry_plus_half_the_token_lifetime() -> None:
    known = {"lb-a": 100.0, "lb-b": 200.0}
    assert evictable(known, now=149.0, grace=50.0) == []
    assert evictable(known, now=151.0, grace=50.0) == ["lb-a"]


def test_connection_ids_and_interface_names_are_deterministic() -> None:
    conn_id = connection_id(SETTINGS, "lb-a")
    assert conn_id == "proxy-a-conduit-a.trench-a.red-lb-a"
    name = interface_name(SETTINGS.service, conn_id)
    assert name == interface_name(SETTINGS.service, conn_id)
    assert len(name) == 15 and name.startswith("conduit-a.")
    assert name != interface_name(SETTINGS.service, connection_id(SETTINGS, "lb-b"))


def test_refresh_follows_nsms_schedule() -> None:
    connection = Connection()
    connection.path.path_segments.extend(
        [
            PathSegment(name="proxy-a", expires=stamp(160)),
            PathSegment(name="nsmgr", expires=stamp(130)),
        ]
    )
    assert time_left(connection, wall_now=100, default=600) == 30
    assert refresh_in(connection, wall_now=100, default=600) == 6  # 0.2 of the first hop's
    single = Connection()
    single.path.path_segments.append(PathSegment(name="proxy-a", expires=stamp(130)))
    assert refresh_in(single, wall_now=100, default=600) == 10  # 1/3 with one segment
    assert refresh_in(Connection(), wall_now=100, default=600) == 200


def test_lb_addresses_come_from_dst_and_garbage_is_skipped() -> None:
    connection = Connection()
    connection.context.ip_context.dst_ip_addrs.extend(
        ["198.18.0.10/24", "nonsense", "2001:db8::a/64"]
    )
    assert {str(a) for a in lb_addresses(connection)} == {"198.18.0.10", "2001:db8::a"}


def test_recovery_takes_our_connection_from_the_managers_first_event() -> None:
    event = ConnectionEvent(type=ConnectionEventType.INITIAL_STATE_TRANSFER)
    ours = event.connections["m-1"]
    ours.id = "m-1"
    ours.mechanism.type = "KERNEL"
    ours.path.index = 1
    ours.path.path_segments.extend([PathSegment(name="proxy-a", id="c-1"), PathSegment(id="m-1")])
    other = event.connections["m-2"]
    other.path.index = 1
    other.path.path_segments.extend([PathSegment(id="c-2"), PathSegment(id="m-2")])
    recovered = recoverable(event, "c-1")
    assert recovered is not None
    assert (recovered.id, recovered.path.index) == ("c-1", 0)
    assert [s.id for s in recovered.path.path_segments] == ["c-1", "m-1"]
    assert recoverable(event, "c-3") is None
    ours.mechanism.type = "MEMIF"
    assert recoverable(event, "c-1") is None


@given(st.floats(min_value=-4e9, max_value=4e9, allow_nan=False))
def test_timestamps_round_trip_within_a_microsecond_negative_ones_too(wall: float) -> None:
    stamp = timestamp(wall)
    assert 0 <= stamp.nanos < 1_000_000_000  # protobuf's rule, also before the epoch
    assert abs(seconds(stamp) - wall) < 1e-6


def test_a_timestamp_before_the_epoch_floors_its_seconds() -> None:
    assert timestamp(-1.25) == Timestamp(seconds=-2, nanos=750_000_000)
    assert timestamp(-1) == Timestamp(seconds=-1, nanos=0)
