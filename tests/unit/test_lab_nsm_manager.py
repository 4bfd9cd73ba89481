"""The lab NSM manager's decisions: validation, NSM's updatepath, endpoint selection with
templated selectors, network namespaces, interface names, expiry, monitor selectors, wiring."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.api.networkservice.connection_pb2 import (
    RESELECT_REQUESTED,
    Connection,
    Mechanism,
    MonitorScopeSelector,
    PathSegment,
)
from proxy.api.networkservice.connectioncontext_pb2 import ConnectionContext, IPContext
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.api.registry.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceLabels,
)
from proxy.lab.nsm.manager import (
    NO_VALUE,
    BadRequest,
    PathError,
    WiringError,
    check_request,
    choose,
    connection_expiry,
    forward_request,
    interface_name,
    labels_fit,
    monitor_selects,
    netns_fallback,
    netns_path,
    passed_url,
    render_template,
    reselect_reason,
    restore_caller,
    select_endpoints,
    update_path,
    valid_ifname,
    wiring_for,
)
from proxy.nsm.wire import seconds, timestamp

SERVICE = "proxy.conduit-a.trench-a.default"


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"new-{next(counter)}"


def connection(
    *segments: tuple[str, str], index: int = 0, conn_id: str | None = None
) -> Connection:
    result = Connection(network_service=SERVICE)
    for name, segment_id in segments:
        result.path.path_segments.add(name=name, id=segment_id)
    result.path.index = index
    result.id = conn_id if conn_id is not None else (segments[index][1] if segments else "")
    return result


def names_and_ids(conn: Connection) -> list[tuple[str, str]]:
    return [(s.name, s.id) for s in conn.path.path_segments]


# -- validation -----------------------------------------------------------------------------------


def request(*mechanisms: Mechanism, conn: Connection | None = None) -> NetworkServiceRequest:
    return NetworkServiceRequest(
        connection=conn if conn is not None else Connection(network_service=SERVICE),
        mechanism_preferences=mechanisms,
    )


def test_the_first_kernel_preference_is_the_client_mechanism() -> None:
    chosen = check_request(
        request(
            Mechanism(cls="LOCAL", type="NOOP"),
            Mechanism(cls="REMOTE", type="KERNEL", parameters={"name": "a"}),
            Mechanism(cls="LOCAL", type="KERNEL", parameters={"name": "b"}),
        )
    )
    assert (chosen.cls, chosen.type, dict(chosen.parameters)) == ("LOCAL", "KERNEL", {"name": "a"})


def test_a_refresh_keeps_the_connection_mechanism() -> None:
    conn = Connection(
        network_service=SERVICE, mechanism=Mechanism(type="KERNEL", parameters={"name": "kept"})
    )
    chosen = check_request(request(Mechanism(type="KERNEL"), conn=conn))
    assert chosen.parameters["name"] == "kept"
    conn.mechanism.type = "NOOP"
    with pytest.raises(BadRequest, match="KERNEL only"):
        check_request(request(Mechanism(type="KERNEL"), conn=conn))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (NetworkServiceRequest(mechanism_preferences=[Mechanism(type="KERNEL")]), "no connection"),
        (request(Mechanism(type="KERNEL"), conn=Connection()), "network_service is empty"),
        (request(), "no mechanism"),
        (request(Mechanism(type="NOOP"), Mechanism(type="MEMIF")), "offered MEMIF, NOOP"),
        (request(Mechanism(type="KERNEL", parameters={"name": "a/b"})), "not a valid interface"),
    ],
)
def test_bad_requests(bad: NetworkServiceRequest, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check_request(bad)


# -- updatepath -----------------------------------------------------------------------------------


def test_the_first_request_appends_the_managers_segment() -> None:
    conn = connection(("client", "c-1"))
    assert update_path(conn, "nsmgr", ids()) == 0
    assert names_and_ids(conn) == [("client", "c-1"), ("nsmgr", "new-0")]
    assert (conn.path.index, conn.id) == (1, "new-0")


def test_a_refresh_finds_the_managers_segment_again() -> None:
    conn = connection(("client", "c-1"), ("nsmgr", "m-1"), ("nse", "e-1"))
    assert update_path(conn, "nsmgr", ids()) == 0
    assert names_and_ids(conn) == [("client", "c-1"), ("nsmgr", "m-1"), ("nse", "e-1")]
    assert (conn.path.index, conn.id) == (1, "m-1")


def test_a_foreign_next_segment_is_taken_over_with_a_new_id() -> None:
    conn = connection(("client", "c-1"), ("other", "o-1"))
    update_path(conn, "nsmgr", ids())
    assert names_and_ids(conn) == [("client", "c-1"), ("nsmgr", "new-0")]
    assert conn.id == "new-0"


def test_a_request_already_at_our_segment_keeps_its_index() -> None:
    conn = connection(("client", "c-1"), ("nsmgr", "m-1"), index=1)
    assert update_path(conn, "nsmgr", ids()) == 1
    assert (conn.path.index, conn.id) == (1, "m-1")


def test_an_empty_path_makes_the_manager_the_first_segment() -> None:
    conn = Connection(id="given")
    assert update_path(conn, "nsmgr", ids()) == 0
    assert names_and_ids(conn) == [("nsmgr", "given")]
    anonymous = Connection()
    update_path(anonymous, "nsmgr", ids())
    assert names_and_ids(anonymous) == [("nsmgr", "new-0")]


def test_path_errors() -> None:
    with pytest.raises(PathError, match="beyond"):
        update_path(connection(("client", "c-1"), index=2, conn_id="c-1"), "nsmgr", ids())
    with pytest.raises(PathError, match="not the id"):
        update_path(connection(("client", "c-1"), conn_id="other"), "nsmgr", ids())


def test_restore_caller() -> None:
    conn = connection(("client", "c-1"), ("nsmgr", "m-1"), ("nse", "e-1"), index=1)
    restore_caller(conn, 0)
    assert (conn.path.index, conn.id) == (0, "c-1")


# -- selection ------------------------------------------------------------------------------------


def test_render_template() -> None:
    labels = {"nodeName": "node-a", "zone": "z1"}
    assert render_template("{{.nodeName}}", labels) == "node-a"
    assert render_template("{{ .zone }}/{{.nodeName}}", labels) == "z1/node-a"
    assert render_template("{{.missing}}", labels) == NO_VALUE
    assert render_template("plain", labels) == "plain"


def test_labels_fit() -> None:
    values = {"nodeName": "node-a"}
    assert labels_fit({"nodeName": "node-a", "x": "1"}, {"nodeName": "{{.nodeName}}"}, values)
    assert labels_fit({"nodeName": "node-a"}, {"nodeName": "node-a"}, {})
    assert not labels_fit({"nodeName": "node-b"}, {"nodeName": "{{.nodeName}}"}, values)
    assert not labels_fit({}, {"nodeName": "{{.nodeName}}"}, values)
    assert labels_fit({}, {}, values)


def nse(name: str, node: str, service: str = SERVICE) -> NetworkServiceEndpoint:
    return NetworkServiceEndpoint(
        name=name,
        network_service_names=[service],
        network_service_labels={service: NetworkServiceLabels(labels={"nodeName": node})},
    )


def same_node_service(*, fallthrough: bool = False) -> NetworkService:
    service = NetworkService(name=SERVICE)
    match = service.matches.add(source_selector={"nodeName": "{{.nodeName}}"})
    match.routes.add(destination_selector={"nodeName": "{{.nodeName}}"})
    match.fallthrough = fallthrough
    return service


ENDPOINTS = [nse("nse-c", "node-b"), nse("nse-a", "node-a"), nse("nse-b", "node-b")]


def chosen_name(service: NetworkService, labels: dict[str, str]) -> str | None:
    picked = choose(select_endpoints(service, ENDPOINTS, labels))
    return picked.name if picked is not None else None


def test_without_matches_every_endpoint_is_a_candidate_and_the_lowest_name_wins() -> None:
    service = NetworkService(name=SERVICE)
    assert [e.name for e in select_endpoints(service, ENDPOINTS, {})] == ["nse-c", "nse-a", "nse-b"]
    assert chosen_name(service, {"nodeName": "node-b"}) == "nse-a"


def test_a_templated_match_selects_the_endpoints_of_the_clients_node() -> None:
    service = same_node_service()
    assert chosen_name(service, {"nodeName": "node-b"}) == "nse-b"
    assert chosen_name(service, {"nodeName": "node-a"}) == "nse-a"
    assert chosen_name(service, {"nodeName": "node-z"}) is None  # a match applied, none fits
    assert chosen_name(service, {}) == "nse-a"  # no match applies: any


def test_a_fallthrough_match_that_picks_none_gives_way() -> None:
    service = same_node_service(fallthrough=True)
    service.matches.add(source_selector={}).routes.add(destination_selector={"nodeName": "node-b"})
    assert chosen_name(service, {"nodeName": "node-z"}) == "nse-b"
    assert chosen_name(service, {"nodeName": "node-a"}) == "nse-a"


def test_a_match_routes_by_literal_destination_labels() -> None:
    service = NetworkService(name=SERVICE)
    match = service.matches.add(source_selector={"app": "firewall"})
    match.routes.add(destination_selector={"nodeName": "node-b"})
    assert chosen_name(service, {"app": "firewall"}) == "nse-b"
    assert chosen_name(service, {"app": "other"}) == "nse-a"


def test_endpoint_labels_of_another_service_do_not_count() -> None:
    service = same_node_service()
    elsewhere = nse("nse-x", "node-a", service="other")
    elsewhere.network_service_names.append(SERVICE)
    assert select_endpoints(service, [elsewhere], {"nodeName": "node-a"}) == []


def test_reselect_reason() -> None:
    refresh = Connection(network_service_endpoint_name="nse-a")
    assert reselect_reason(refresh, "nse-a", registered=True) is None
    assert reselect_reason(Connection(), "nse-a", registered=True) is None
    assert reselect_reason(refresh, "nse-a", registered=False) == "endpoint no longer registered"
    assert "'nse-b' named" in str(
        reselect_reason(Connection(network_service_endpoint_name="nse-b"), "nse-a", True)
    )
    refresh.state = RESELECT_REQUESTED
    assert reselect_reason(refresh, "nse-a", registered=True) == "reselect requested"


# -- namespaces, names, expiry --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "pid", "expected"),
    [
        ("", 42, "/proc/42/ns/net"),
        ("inode://4/4026532", 42, "/proc/42/ns/net"),  # no descriptor came with it: the pid
        ("file:///run/netns/mp-a", 42, "/run/netns/mp-a"),
        ("file:///run/netns/mp-a", None, "/run/netns/mp-a"),
        ("file:///proc/self/ns/net", 42, "/proc/42/ns/net"),
        ("file:///proc/thread-self/ns/net", 42, "/proc/42/ns/net"),
        ("file:///proc/self/ns/net", None, None),  # not ours to read
        ("", None, None),
        ("file://relative", None, None),
    ],
)
def test_netns_path(url: str, pid: int | None, expected: str | None) -> None:
    mechanism = Mechanism(type="KERNEL", parameters={"inodeURL": url} if url else {})
    assert netns_path(mechanism, pid) == expected


def test_passed_url_and_the_fallbacks_named() -> None:
    def mechanism(url: str) -> Mechanism:
        return Mechanism(type="KERNEL", parameters={"inodeURL": url} if url else {})

    assert passed_url(mechanism("inode://4/4026532")) == "inode://4/4026532"
    assert passed_url(mechanism("file:///proc/self/ns/net")) is None
    assert passed_url(mechanism("")) is None and passed_url(None) is None
    with pytest.raises(BadRequest, match="inodeURL"):
        passed_url(mechanism("inode://4/not-a-number"))
    assert netns_fallback(mechanism("file:///run/netns/a")) == "file:// inodeURL"
    assert netns_fallback(mechanism("inode://4/4")) == "socket peer's process"
    assert netns_fallback(None) == "socket peer's process"


@given(st.text(min_size=1, max_size=40))
def test_generated_interface_names_are_nsm_shaped(service: str) -> None:
    name = interface_name(service)
    prefix, suffix = name[:-5], name[-5:]
    assert prefix == service[:10] and suffix[0] == "-" and suffix[1:].isalnum()
    assert len(name) <= 15


def test_interface_name_example() -> None:
    assert interface_name("conduit-a.trench-a", lambda _: "x") == "conduit-a.-xxxx"


@pytest.mark.parametrize(
    ("name", "valid"),
    [("eth0", True), ("a" * 15, True), ("a" * 16, False), ("", False), (".", False),
     ("a/b", False), ("a b", False), ("a:1", False)],
)  # fmt: skip
def test_valid_ifname(name: str, valid: bool) -> None:
    assert valid_ifname(name) is valid


def test_connection_expiry_is_the_earliest_segment_expiry() -> None:
    conn = connection(("client", "c"), ("nsmgr", "m"), ("nse", "e"))
    assert connection_expiry(conn) == math.inf
    conn.path.path_segments[1].expires.CopyFrom(timestamp(2000))
    conn.path.path_segments[2].expires.CopyFrom(timestamp(1500.5))
    assert connection_expiry(conn) == 1500.5


def test_forward_request_points_at_the_managers_hop() -> None:
    conn = connection(("client", "c"), ("nsmgr", "m"), index=1)
    conn.mechanism.CopyFrom(Mechanism(cls="LOCAL", type="KERNEL", parameters={"name": "cli"}))
    first = forward_request(conn, "nse-a", None, 1060.0)
    assert (first.connection.path.index, first.connection.id) == (1, "m")
    assert first.connection.network_service_endpoint_name == "nse-a"
    assert not first.connection.HasField("mechanism")  # the client's is not the NSE's
    assert seconds(first.connection.path.path_segments[1].expires) == 1060
    assert [(m.cls, m.type) for m in first.mechanism_preferences] == [("LOCAL", "KERNEL")]
    kept = Mechanism(cls="LOCAL", type="KERNEL", parameters={"name": "nse-if0"})
    assert forward_request(conn, "nse-a", kept, 1060.0).connection.mechanism == kept
    assert not conn.path.path_segments[1].HasField("expires")  # the input is untouched


# -- monitor selectors ----------------------------------------------------------------------------


MONITORED = connection(("client", "c-1"), ("nsmgr", "m-1"), ("nse", "e-1"), index=1)


def run(*segments: PathSegment) -> MonitorScopeSelector:
    return MonitorScopeSelector(path_segments=segments)


@pytest.mark.parametrize(
    ("selector", "selected"),
    [
        (MonitorScopeSelector(), True),
        (MonitorScopeSelector(network_services=[SERVICE, "x"]), True),
        (MonitorScopeSelector(network_services=["x"]), False),
        (run(PathSegment(id="c-1")), True),
        (run(PathSegment(name="nse")), True),
        (run(PathSegment(name="nse", id="c-1")), False),
        (run(PathSegment(name="client"), PathSegment()), True),
        (run(PathSegment(name="nsmgr"), PathSegment(id="e-1")), True),
        (run(PathSegment(name="client"), PathSegment(name="nse")), False),  # not contiguous
        (run(*[PathSegment()] * 4), False),  # longer than the path
        (run(PathSegment(token="t")), False),
    ],
)
def test_monitor_selectors(selector: MonitorScopeSelector, selected: bool) -> None:
    assert monitor_selects(selector, MONITORED) is selected


# -- wiring ---------------------------------------------------------------------------------------


def answer(**parameters: str) -> Connection:
    result = connection(("client", "c"), ("nsmgr", "m"), ("nse", "e"), index=1)
    result.mechanism.CopyFrom(Mechanism(cls="LOCAL", type="KERNEL", parameters=parameters))
    result.context.CopyFrom(
        ConnectionContext(ip_context=IPContext(src_ip_addrs=["198.18.0.2/30"]), MTU=9000)
    )
    return result


def test_wiring_from_the_answer() -> None:
    wiring = wiring_for("m", "/proc/1/ns/net", "cli0", answer(name="nse0"), 7, "fallback")
    assert (wiring.endpoint_netns, wiring.endpoint_ifname, wiring.mtu) == (
        "/proc/7/ns/net",
        "nse0",
        9000,
    )
    assert list(wiring.ip_context.src_ip_addrs) == ["198.18.0.2/30"]


def test_wiring_by_a_passed_descriptor_wins_over_the_url_and_the_pid() -> None:
    passed = answer(name="nse0", inodeURL="inode://4/4026532")
    wiring = wiring_for("m", "/proc/9/fd/12", "cli0", passed, 7, "fallback", "/proc/9/fd/13")
    assert (wiring.client_netns, wiring.endpoint_netns) == ("/proc/9/fd/12", "/proc/9/fd/13")
    unpassed = wiring_for("m", "/proc/9/fd/12", "cli0", passed, 7, "fallback")
    assert unpassed.endpoint_netns == "/proc/7/ns/net"  # no descriptor: its process


def test_wiring_fallbacks_and_failures() -> None:
    unnamed = answer(inodeURL="file:///run/netns/mp-lb")
    unnamed.context.MTU = 0
    wiring = wiring_for("m", "/proc/1/ns/net", "cli0", unnamed, None, "fallback")
    assert (wiring.endpoint_netns, wiring.endpoint_ifname, wiring.mtu) == (
        "/run/netns/mp-lb",
        "fallback",
        1500,
    )
    with pytest.raises(WiringError, match="network namespace"):
        wiring_for("m", "/proc/1/ns/net", "cli0", answer(name="nse0"), None, "fallback")
    with pytest.raises(WiringError, match="interface name"):
        wiring_for("m", "/proc/1/ns/net", "cli0", answer(name="x" * 16), 7, "fallback")


def test_path_map_translates_container_endpoint_urls_only() -> None:
    from proxy.lab.nsm.manager import mapped_url

    path_map = ("/tmp", "/var/tmp/pod")
    assert mapped_url("unix:///tmp/p-1/listen.on", path_map) == "unix:///var/tmp/pod/p-1/listen.on"
    assert mapped_url("unix:///run/lb.sock", path_map) == "unix:///run/lb.sock"
    assert mapped_url("unix:///tmpx/a", path_map) == "unix:///tmpx/a"
    assert mapped_url("unix:///tmp/a", None) == "unix:///tmp/a"
