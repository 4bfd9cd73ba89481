"""The generated descriptors match the wire contract of wire-api.md §3, in both directions.

The tables below are transcribed by hand from wire-api.md §3 (not derived from the .proto files),
so that a wrong field number, type, label, enum value or method shape in proto/ fails here.
Notation follows wire-api.md: label "" = singular, "rep" = repeated, "map" = proto map (type
written `map<K,V>`); message/enum types are written `msg:<full name>` / `enum:<full name>`.

How it was checked that this test can fail (each on a scratch copy, not in the tree):
* table side: changed `nsp.v1.Stream` maxTargets from 3 to 4 in MESSAGES and dropped
  `connection.State.RESELECT_REQUESTED` from ENUMS -> test_messages failed with
  "nsp.v1.Stream 4: missing ('maxTargets', ...)" / "nsp.v1.Stream 3: extra (...)", and
  test_enums with "connection.State 3: extra 'RESELECT_REQUESTED'";
* generated side: regenerated a copy of proxy/api from a proto/ with `maxTargets = 4`, an extra
  field 5 in Stream and a unary WatchVip -> test_messages reported the missing/extra fields and
  test_services "WatchVip: contract (..., False, True) != generated (..., False, False)".
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import TypeVar

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
)

import proxy.api

# --------------------------------------------------------------------------------------------
# The contract (wire-api.md §3)
# --------------------------------------------------------------------------------------------

Field = tuple[str, str, str]  # (name, type, label)
K = TypeVar("K")
V = TypeVar("V")

STR_MAP = "map<string,string>"

# proto file (path under proto/) -> proto package
FILES: dict[str, str] = {
    "proxy/api/networkservice/connectioncontext.proto": "connectioncontext",
    "proxy/api/networkservice/connection.proto": "connection",
    "proxy/api/networkservice/networkservice.proto": "networkservice",
    "proxy/api/registry/registry.proto": "registry",
    "proxy/api/health/v1/health.proto": "grpc.health.v1",
    "proxy/api/nsp/v1/model.proto": "nsp.v1",
    "proxy/api/nsp/v1/configurationmanager.proto": "nsp.v1",
    "proxy/api/nsp/v1/targetregistry.proto": "nsp.v1",
    "proxy/api/ipam/v1/ipam.proto": "ipam.v1",
    "proxy/api/workload/workload.proto": "",  # the SPIFFE Workload API has no package
}

MESSAGES: dict[str, dict[int, Field]] = {
    # §3.0 well-known types
    "google.protobuf.Timestamp": {1: ("seconds", "int64", ""), 2: ("nanos", "int32", "")},
    "google.protobuf.Empty": {},
    # §3.1 connectioncontext
    "connectioncontext.IpNeighbor": {
        1: ("ip", "string", ""),
        2: ("hardware_address", "string", ""),
    },
    "connectioncontext.Route": {1: ("prefix", "string", ""), 2: ("nextHop", "string", "")},
    "connectioncontext.IpFamily": {1: ("family", "enum:connectioncontext.IpFamily.Family", "")},
    "connectioncontext.ExtraPrefixRequest": {
        1: ("addr_family", "msg:connectioncontext.IpFamily", ""),
        2: ("prefix_len", "uint32", ""),
        3: ("required_number", "uint32", ""),
        4: ("requested_number", "uint32", ""),
    },
    "connectioncontext.PolicyRoute": {
        1: ("from", "string", ""),
        2: ("proto", "string", ""),
        3: ("dst_port", "string", ""),
        4: ("src_port", "string", ""),
        5: ("routes", "msg:connectioncontext.Route", "rep"),
    },
    "connectioncontext.IPContext": {
        1: ("src_ip_addrs", "string", "rep"),
        2: ("dst_ip_addrs", "string", "rep"),
        3: ("src_ip_required", "bool", ""),
        4: ("dst_ip_required", "bool", ""),
        5: ("src_routes", "msg:connectioncontext.Route", "rep"),
        6: ("dst_routes", "msg:connectioncontext.Route", "rep"),
        7: ("excluded_prefixes", "string", "rep"),
        8: ("ip_neighbors", "msg:connectioncontext.IpNeighbor", "rep"),
        9: ("extra_prefix_request", "msg:connectioncontext.ExtraPrefixRequest", "rep"),
        10: ("extra_prefixes", "string", "rep"),
        11: ("policies", "msg:connectioncontext.PolicyRoute", "rep"),
    },
    "connectioncontext.DNSConfig": {
        1: ("dns_server_ips", "string", "rep"),
        2: ("search_domains", "string", "rep"),
    },
    "connectioncontext.DNSContext": {1: ("configs", "msg:connectioncontext.DNSConfig", "rep")},
    "connectioncontext.EthernetContext": {
        1: ("src_mac", "string", ""),
        2: ("dst_mac", "string", ""),
        3: ("vlan_tag", "int32", ""),
    },
    "connectioncontext.ConnectionContext": {
        1: ("ip_context", "msg:connectioncontext.IPContext", ""),
        2: ("dns_context", "msg:connectioncontext.DNSContext", ""),
        3: ("ethernet_context", "msg:connectioncontext.EthernetContext", ""),
        4: ("extra_context", STR_MAP, "map"),
        5: ("MTU", "uint32", ""),
    },
    # §3.2 connection
    "connection.Mechanism": {
        1: ("cls", "string", ""),
        2: ("type", "string", ""),
        3: ("parameters", STR_MAP, "map"),
    },
    "connection.PathSegment": {
        1: ("name", "string", ""),
        2: ("id", "string", ""),
        3: ("token", "string", ""),
        4: ("expires", "msg:google.protobuf.Timestamp", ""),
        5: ("metrics", STR_MAP, "map"),
    },
    "connection.Path": {
        1: ("index", "uint32", ""),
        2: ("path_segments", "msg:connection.PathSegment", "rep"),
    },
    "connection.Connection": {
        1: ("id", "string", ""),
        2: ("network_service", "string", ""),
        3: ("mechanism", "msg:connection.Mechanism", ""),
        4: ("context", "msg:connectioncontext.ConnectionContext", ""),
        5: ("labels", STR_MAP, "map"),
        6: ("path", "msg:connection.Path", ""),
        7: ("network_service_endpoint_name", "string", ""),
        8: ("payload", "string", ""),
        9: ("state", "enum:connection.State", ""),
    },
    "connection.ConnectionEvent": {
        1: ("type", "enum:connection.ConnectionEventType", ""),
        2: ("connections", "map<string,msg:connection.Connection>", "map"),
    },
    "connection.MonitorScopeSelector": {
        1: ("path_segments", "msg:connection.PathSegment", "rep"),
        2: ("network_services", "string", "rep"),
    },
    # §3.3 networkservice
    "networkservice.NetworkServiceRequest": {
        1: ("connection", "msg:connection.Connection", ""),
        2: ("mechanism_preferences", "msg:connection.Mechanism", "rep"),
    },
    # §3.4 registry
    "registry.NetworkService": {
        1: ("name", "string", ""),
        2: ("payload", "string", ""),
        3: ("matches", "msg:registry.Match", "rep"),
        4: ("path_ids", "string", "rep"),
    },
    "registry.Match": {
        1: ("source_selector", STR_MAP, "map"),
        2: ("routes", "msg:registry.Destination", "rep"),
        3: ("fallthrough", "bool", ""),
        4: ("metadata", "msg:registry.Metadata", ""),
    },
    "registry.Metadata": {1: ("labels", STR_MAP, "map")},
    "registry.Destination": {
        1: ("destination_selector", STR_MAP, "map"),
        2: ("weight", "uint32", ""),
    },
    "registry.NetworkServiceLabels": {1: ("labels", STR_MAP, "map")},
    "registry.NetworkServiceEndpoint": {
        1: ("name", "string", ""),
        2: ("network_service_names", "string", "rep"),
        3: ("network_service_labels", "map<string,msg:registry.NetworkServiceLabels>", "map"),
        4: ("url", "string", ""),
        5: ("expiration_time", "msg:google.protobuf.Timestamp", ""),
        6: ("initial_registration_time", "msg:google.protobuf.Timestamp", ""),
        7: ("path_ids", "string", "rep"),
    },
    "registry.NetworkServiceQuery": {
        1: ("network_service", "msg:registry.NetworkService", ""),
        2: ("watch", "bool", ""),
    },
    "registry.NetworkServiceEndpointQuery": {
        1: ("network_service_endpoint", "msg:registry.NetworkServiceEndpoint", ""),
        2: ("watch", "bool", ""),
    },
    "registry.NetworkServiceResponse": {
        1: ("network_service", "msg:registry.NetworkService", ""),
        2: ("deleted", "bool", ""),
    },
    "registry.NetworkServiceEndpointResponse": {
        1: ("network_service_endpoint", "msg:registry.NetworkServiceEndpoint", ""),
        2: ("deleted", "bool", ""),
    },
    # §3.5 grpc.health.v1
    "grpc.health.v1.HealthCheckRequest": {1: ("service", "string", "")},
    "grpc.health.v1.HealthCheckResponse": {
        1: ("status", "enum:grpc.health.v1.HealthCheckResponse.ServingStatus", ""),
    },
    "grpc.health.v1.HealthListRequest": {},
    "grpc.health.v1.HealthListResponse": {
        1: ("statuses", "map<string,msg:grpc.health.v1.HealthCheckResponse>", "map"),
    },
    # §3.6 nsp.v1
    "nsp.v1.Trench": {1: ("name", "string", "")},
    "nsp.v1.Conduit": {
        1: ("name", "string", ""),
        2: ("trench", "msg:nsp.v1.Trench", ""),
        3: ("destinationPortNats", "msg:nsp.v1.Conduit.PortNat", "rep"),
    },
    "nsp.v1.Conduit.PortNat": {
        1: ("port", "uint32", ""),
        2: ("targetPort", "uint32", ""),
        3: ("vips", "msg:nsp.v1.Vip", "rep"),
        4: ("protocol", "string", ""),
    },
    "nsp.v1.Stream": {
        1: ("name", "string", ""),
        2: ("conduit", "msg:nsp.v1.Conduit", ""),
        3: ("maxTargets", "uint32", ""),
    },
    "nsp.v1.Flow": {
        1: ("name", "string", ""),
        2: ("sourceSubnets", "string", "rep"),
        3: ("destinationPortRanges", "string", "rep"),
        4: ("sourcePortRanges", "string", "rep"),
        5: ("protocols", "string", "rep"),
        6: ("priority", "int32", ""),
        7: ("stream", "msg:nsp.v1.Stream", ""),
        8: ("vips", "msg:nsp.v1.Vip", "rep"),
        10: ("byteMatches", "string", "rep"),
    },
    "nsp.v1.Vip": {
        1: ("name", "string", ""),
        2: ("address", "string", ""),
        3: ("trench", "msg:nsp.v1.Trench", ""),
    },
    "nsp.v1.Attractor": {
        1: ("name", "string", ""),
        2: ("trench", "msg:nsp.v1.Trench", ""),
        3: ("vips", "msg:nsp.v1.Vip", "rep"),
        4: ("gateways", "msg:nsp.v1.Gateway", "rep"),
    },
    "nsp.v1.Gateway": {
        1: ("name", "string", ""),
        2: ("address", "string", ""),
        3: ("ipFamily", "string", ""),
        4: ("protocol", "string", ""),
        5: ("remoteASN", "uint32", ""),
        6: ("localASN", "uint32", ""),
        7: ("remotePort", "uint32", ""),
        8: ("localPort", "uint32", ""),
        9: ("holdTime", "uint32", ""),
        10: ("bfd", "bool", ""),
        11: ("bfdSpec", "msg:nsp.v1.Gateway.BfdSpec", ""),
        12: ("trench", "msg:nsp.v1.Trench", ""),
        13: ("bgpAuth", "msg:nsp.v1.Gateway.BgpAuth", ""),
    },
    "nsp.v1.Gateway.BfdSpec": {
        1: ("MinTx", "uint32", ""),
        2: ("MinRx", "uint32", ""),
        3: ("Multiplier", "uint32", ""),
    },
    "nsp.v1.Gateway.BgpAuth": {1: ("keyName", "string", ""), 2: ("keySource", "string", "")},
    "nsp.v1.TrenchResponse": {1: ("trench", "msg:nsp.v1.Trench", "")},
    "nsp.v1.ConduitResponse": {1: ("conduits", "msg:nsp.v1.Conduit", "rep")},
    "nsp.v1.StreamResponse": {1: ("streams", "msg:nsp.v1.Stream", "rep")},
    "nsp.v1.FlowResponse": {1: ("flows", "msg:nsp.v1.Flow", "rep")},
    "nsp.v1.VipResponse": {1: ("vips", "msg:nsp.v1.Vip", "rep")},
    "nsp.v1.AttractorResponse": {1: ("attractors", "msg:nsp.v1.Attractor", "rep")},
    "nsp.v1.GatewayResponse": {1: ("gateways", "msg:nsp.v1.Gateway", "rep")},
    "nsp.v1.Target": {
        1: ("ips", "string", "rep"),
        2: ("context", STR_MAP, "map"),
        3: ("status", "enum:nsp.v1.Target.Status", ""),
        4: ("type", "enum:nsp.v1.Target.Type", ""),
        5: ("stream", "msg:nsp.v1.Stream", ""),
    },
    "nsp.v1.TargetResponse": {1: ("targets", "msg:nsp.v1.Target", "rep")},
    # §3.7 ipam.v1
    "ipam.v1.Prefix": {1: ("address", "string", ""), 2: ("prefixLength", "int32", "")},
    "ipam.v1.Subnet": {
        1: ("conduit", "msg:nsp.v1.Conduit", ""),
        2: ("node", "string", ""),
        3: ("ipFamily", "enum:ipam.v1.IPFamily", ""),
    },
    "ipam.v1.Child": {1: ("name", "string", ""), 2: ("subnet", "msg:ipam.v1.Subnet", "")},
    # SPIFFE Workload API, X.509 part (go-spiffe v2 workload.proto)
    "X509SVIDRequest": {},
    "X509SVIDResponse": {
        1: ("svids", "msg:X509SVID", "rep"),
        2: ("crl", "bytes", "rep"),
        3: ("federated_bundles", "map<string,bytes>", "map"),
    },
    "X509SVID": {
        1: ("spiffe_id", "string", ""),
        2: ("x509_svid", "bytes", ""),
        3: ("x509_svid_key", "bytes", ""),
        4: ("bundle", "bytes", ""),
        5: ("hint", "string", ""),
    },
    "X509BundlesRequest": {},
    "X509BundlesResponse": {1: ("bundles", "map<string,bytes>", "map")},
}

# enum full name -> {number: value name}
ENUMS: dict[str, dict[int, str]] = {
    "connectioncontext.IpFamily.Family": {0: "IPV4", 1: "IPV6"},
    "connection.State": {0: "UP", 1: "DOWN", 2: "REFRESH_REQUESTED", 3: "RESELECT_REQUESTED"},
    "connection.ConnectionEventType": {0: "INITIAL_STATE_TRANSFER", 1: "UPDATE", 2: "DELETE"},
    "grpc.health.v1.HealthCheckResponse.ServingStatus": {
        0: "UNKNOWN",
        1: "SERVING",
        2: "NOT_SERVING",
        3: "SERVICE_UNKNOWN",
    },
    "nsp.v1.Target.Status": {0: "ENABLED", 1: "DISABLED", 2: "ANY"},
    "nsp.v1.Target.Type": {0: "DEFAULT", 1: "FRONTEND"},
    "ipam.v1.IPFamily": {0: "IPV4", 1: "IPV6"},
}

Method = tuple[str, str, bool, bool]  # (request, response, client streaming, server streaming)
EMPTY = "google.protobuf.Empty"

# service full name -> {method name: (request, response, client streaming, server streaming)}
SERVICES: dict[str, dict[str, Method]] = {
    "SpiffeWorkloadAPI": {
        "FetchX509SVID": ("X509SVIDRequest", "X509SVIDResponse", False, True),
        "FetchX509Bundles": ("X509BundlesRequest", "X509BundlesResponse", False, True),
    },
    "connection.MonitorConnection": {
        "MonitorConnections": (
            "connection.MonitorScopeSelector",
            "connection.ConnectionEvent",
            False,
            True,
        ),
    },
    "networkservice.NetworkService": {
        "Request": ("networkservice.NetworkServiceRequest", "connection.Connection", False, False),
        "Close": ("connection.Connection", EMPTY, False, False),
    },
    "registry.NetworkServiceEndpointRegistry": {
        "Register": (
            "registry.NetworkServiceEndpoint",
            "registry.NetworkServiceEndpoint",
            False,
            False,
        ),
        "Find": (
            "registry.NetworkServiceEndpointQuery",
            "registry.NetworkServiceEndpointResponse",
            False,
            True,
        ),
        "Unregister": ("registry.NetworkServiceEndpoint", EMPTY, False, False),
    },
    "registry.NetworkServiceRegistry": {
        "Register": ("registry.NetworkService", "registry.NetworkService", False, False),
        "Find": ("registry.NetworkServiceQuery", "registry.NetworkServiceResponse", False, True),
        "Unregister": ("registry.NetworkService", EMPTY, False, False),
    },
    "grpc.health.v1.Health": {
        "Check": (
            "grpc.health.v1.HealthCheckRequest",
            "grpc.health.v1.HealthCheckResponse",
            False,
            False,
        ),
        "Watch": (
            "grpc.health.v1.HealthCheckRequest",
            "grpc.health.v1.HealthCheckResponse",
            False,
            True,
        ),
        "List": (
            "grpc.health.v1.HealthListRequest",
            "grpc.health.v1.HealthListResponse",
            False,
            False,
        ),
    },
    "nsp.v1.ConfigurationManager": {
        "WatchTrench": ("nsp.v1.Trench", "nsp.v1.TrenchResponse", False, True),
        "WatchConduit": ("nsp.v1.Conduit", "nsp.v1.ConduitResponse", False, True),
        "WatchStream": ("nsp.v1.Stream", "nsp.v1.StreamResponse", False, True),
        "WatchFlow": ("nsp.v1.Flow", "nsp.v1.FlowResponse", False, True),
        "WatchVip": ("nsp.v1.Vip", "nsp.v1.VipResponse", False, True),
        "WatchAttractor": ("nsp.v1.Attractor", "nsp.v1.AttractorResponse", False, True),
        "WatchGateway": ("nsp.v1.Gateway", "nsp.v1.GatewayResponse", False, True),
    },
    "nsp.v1.TargetRegistry": {
        "Register": ("nsp.v1.Target", EMPTY, False, False),
        "Unregister": ("nsp.v1.Target", EMPTY, False, False),
        "Watch": ("nsp.v1.Target", "nsp.v1.TargetResponse", False, True),
    },
    "ipam.v1.Ipam": {
        "Allocate": ("ipam.v1.Child", "ipam.v1.Prefix", False, False),
        "Release": ("ipam.v1.Child", EMPTY, False, False),
    },
}

# --------------------------------------------------------------------------------------------
# The same shapes, read from the generated descriptors
# --------------------------------------------------------------------------------------------

_SCALAR_NAMES: dict[int, str] = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_FIXED32: "fixed32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
}


def _pb2_modules() -> list[ModuleType]:
    names = [m.name for m in pkgutil.walk_packages(proxy.api.__path__, "proxy.api.")]
    return [importlib.import_module(n) for n in sorted(names) if n.endswith("_pb2")]


def _files() -> list[FileDescriptor]:
    """Our generated files plus everything they import (the google.protobuf well-known types)."""
    seen: dict[str, FileDescriptor] = {}
    todo: list[FileDescriptor] = [m.DESCRIPTOR for m in _pb2_modules()]
    while todo:
        fd = todo.pop()
        if fd.name not in seen:
            seen[fd.name] = fd
            todo.extend(fd.dependencies)
    return [seen[name] for name in sorted(seen)]


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _enum_type(field: FieldDescriptor) -> EnumDescriptor:
    assert field.enum_type is not None, field.full_name
    return field.enum_type


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and _message_type(field).GetOptions().map_entry
        and field.is_repeated
    )


def _type_name(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return f"msg:{_message_type(field).full_name}"
    if field.type == FieldDescriptor.TYPE_ENUM:
        return f"enum:{_enum_type(field).full_name}"
    return _SCALAR_NAMES.get(field.type, f"unexpected-type-{field.type}")


def _field_shape(field: FieldDescriptor) -> Field:
    if _is_map(field):
        entry = _message_type(field)
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return (field.name, f"map<{_type_name(key)},{_type_name(value)}>", "map")
    return (field.name, _type_name(field), "rep" if field.is_repeated else "")


def _walk_messages(messages: list[Descriptor]) -> Iterator[Descriptor]:
    for message in messages:
        if message.GetOptions().map_entry:
            continue  # covered by the map<K,V> type of the field that uses it
        yield message
        yield from _walk_messages(list(message.nested_types))


def _walk_enums(fd: FileDescriptor) -> Iterator[EnumDescriptor]:
    yield from fd.enum_types_by_name.values()
    for message in _walk_messages(list(fd.message_types_by_name.values())):
        yield from message.enum_types


def generated_messages() -> dict[str, dict[int, Field]]:
    return {
        message.full_name: {f.number: _field_shape(f) for f in message.fields}
        for fd in _files()
        for message in _walk_messages(list(fd.message_types_by_name.values()))
    }


def generated_enums() -> dict[str, dict[int, str]]:
    result: dict[str, dict[int, str]] = {}
    for fd in _files():
        for enum in _walk_enums(fd):
            result[enum.full_name] = {v.number: v.name for v in enum.values}
    return result


def generated_services() -> dict[str, dict[str, Method]]:
    return {
        service.full_name: {
            m.name: (
                m.input_type.full_name,
                m.output_type.full_name,
                m.client_streaming,
                m.server_streaming,
            )
            for m in service.methods
        }
        for fd in _files()
        for service in fd.services_by_name.values()
    }


def _differences(
    label: str, expected: Mapping[str, Mapping[K, V]], actual: Mapping[str, Mapping[K, V]]
) -> list[str]:
    """Every difference between two {name: {key: shape}} tables, in both directions."""
    out: list[str] = []
    for name in sorted(expected.keys() - actual.keys()):
        out.append(f"missing {label} {name} (in contract, not generated)")
    for name in sorted(actual.keys() - expected.keys()):
        out.append(f"extra {label} {name} (generated, not in contract)")
    for name in sorted(expected.keys() & actual.keys()):
        exp, act = expected[name], actual[name]
        for key in sorted(exp.keys() - act.keys(), key=str):
            out.append(f"{name} {key}: missing {exp[key]!r}")
        for key in sorted(act.keys() - exp.keys(), key=str):
            out.append(f"{name} {key}: extra {act[key]!r}")
        for key in sorted(exp.keys() & act.keys(), key=str):
            if exp[key] != act[key]:
                out.append(f"{name} {key}: contract {exp[key]!r} != generated {act[key]!r}")
    return out


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_files_and_packages() -> None:
    actual = {}
    for module in _pb2_modules():
        fd = module.DESCRIPTOR
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        assert proto.syntax == "proto3", f"{fd.name}: syntax {proto.syntax!r}"
        actual[fd.name] = fd.package
    assert actual == FILES


def test_messages() -> None:
    diffs = _differences("message", MESSAGES, generated_messages())
    assert not diffs, "\n".join(diffs)


def test_no_oneofs() -> None:
    # Nothing in the contract is a oneof or proto3 `optional` (which adds a synthetic oneof).
    with_oneofs = [
        m.full_name
        for fd in _files()
        for m in _walk_messages(list(fd.message_types_by_name.values()))
        if m.oneofs
    ]
    assert with_oneofs == []


def test_enums() -> None:
    diffs = _differences("enum", ENUMS, generated_enums())
    assert not diffs, "\n".join(diffs)


def test_services() -> None:
    diffs = _differences("service", SERVICES, generated_services())
    assert not diffs, "\n".join(diffs)
