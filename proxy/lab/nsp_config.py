"""The lab NSP's configuration file: parsing, validation, and Meridio's watch filters (pure).

The file is YAML (with PyYAML installed) or JSON, one mapping. Its sections mirror the data keys
of Meridio's trench ConfigMap and its field names (`pkg/configuration/reader`): `trench`,
`conduits`, `streams`, `flows`, `vips`, `attractors`, `gateways`. Every section is optional; a
list section may also be written as Meridio's `{items: [...]}`. Each entry references its parent
by name: conduits, vips, attractors and gateways their `trench`, streams their `conduit`, flows
their `stream`; flows, attractors and port NATs list the `vips` (and attractors the `gateways`)
they use by name.

    trench:
      name: trench-a
    conduits:
      - name: conduit-a
        trench: trench-a
        destination-port-nats:        # optional
          - {port: 80, target-port: 8080, protocol: tcp, vips: [vip-v4]}
    streams:
      - {name: stream-a, conduit: conduit-a, max-targets: 100}
    flows:
      - name: flow-a
        stream: stream-a
        vips: [vip-v4, vip-v6]
        source-subnets: [0.0.0.0/0, "::/0"]
        destination-port-ranges: ["80", "8080-8090"]
        source-port-ranges: ["1024-65535"]
        protocols: [tcp, udp]
        priority: 1
        byte-matches: []
    vips:
      - {name: vip-v4, address: 198.19.0.1/32, trench: trench-a}
      - {name: vip-v6, address: "2001:db8:ff::1/128", trench: trench-a}
    attractors:
      - {name: attractor-a, trench: trench-a, vips: [vip-v4, vip-v6], gateways: [gateway-v4]}
    gateways:
      - name: gateway-v4
        trench: trench-a
        address: 198.19.255.1
        ip-family: ipv4
        protocol: bgp
        remote-asn: 4248829953
        local-asn: 8103
        remote-port: 10179
        local-port: 10179
        hold-time: 24
        bfd: true                    # then min-tx, min-rx, multiplier fill bfdSpec
        min-tx: 300
        min-rx: 300
        multiplier: 5
        bgp-auth: {key-name: key-a, key-source: secret-a}   # optional

What is checked, and what is not:

* Structure is checked: a mapping at the top; only the keys above (a typo is an error, not a
  silently ignored field); every entry has a non-empty, unique `name`; every reference names an
  entry that exists (a `trench` reference must name the file's trench); strings are strings,
  numbers are integers in the wire field's range, `bfd` is a boolean. List-of-string fields also
  take integers (YAML reads `- 80` as one).
* Addresses are not: a VIP's `address` (and a gateway's) is sent verbatim, whatever it is. The
  NSP is where the proxy's VIPs come from and the proxy must cope with garbage itself, so tests
  can feed it `not-an-address`, `198.19.0.1` without a length, or an empty string through here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from proxy.api.nsp.v1.model_pb2 import Attractor, Conduit, Flow, Gateway, Stream, Trench, Vip

_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_PORT = (0, 65535)
_SECTIONS = ("trench", "conduits", "streams", "flows", "vips", "attractors", "gateways")


class ConfigFileError(ValueError):
    """The file is not a valid configuration; `problems` lists every reason found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@attrs.frozen
class NspConfig:
    """One trench's configuration as the wire messages, each entry with its parents resolved
    (as Meridio's NSP sends them: a Stream carries its Conduit, which carries its Trench)."""

    trench: Trench | None = None
    conduits: tuple[Conduit, ...] = ()
    streams: tuple[Stream, ...] = ()
    flows: tuple[Flow, ...] = ()
    vips: tuple[Vip, ...] = ()
    attractors: tuple[Attractor, ...] = ()
    gateways: tuple[Gateway, ...] = ()

    def summary(self) -> dict[str, Any]:
        """Counts for a log line."""
        return {
            "trench": self.trench.name if self.trench is not None else "",
            "conduits": len(self.conduits),
            "streams": len(self.streams),
            "flows": len(self.flows),
            "vips": len(self.vips),
            "attractors": len(self.attractors),
            "gateways": len(self.gateways),
        }


# -- text to data ----------------------------------------------------------------------------------


def load_data(text: str) -> Any:
    """YAML when PyYAML is installed (JSON is YAML too), else JSON."""
    try:
        import yaml
    except ImportError:
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ConfigFileError(
                [f"not JSON ({exc}); YAML needs PyYAML (pip install 'meridio-proxy[lab]')"]
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigFileError([f"not YAML: {' '.join(str(exc).split())}"]) from None


def parse_config(text: str) -> NspConfig:
    """Parse and validate a configuration file's text; ConfigFileError lists the problems."""
    return build_config(load_data(text))


# -- data to configuration -------------------------------------------------------------------------


class _Entry:
    """One mapping of the file, read field by field; problems are collected, not raised."""

    def __init__(
        self, where: str, data: Any, allowed: tuple[str, ...], problems: list[str]
    ) -> None:
        self.where = where
        self.problems = problems
        self.name = ""  # set by _entries once read
        self.data: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
        if not isinstance(data, Mapping):
            self.problem(f"must be a mapping, not {_kind(data)}")
        for key in self.data:
            if key not in allowed:
                self.problem(f"unknown key {key!r} (expected one of: {', '.join(allowed)})")

    def problem(self, text: str, key: str | None = None) -> None:
        where = f"{self.where}.{key}" if key else self.where
        self.problems.append(f"{where}: {text}")

    def text(self, key: str, *, required: bool = False, nonempty: bool = False) -> str:
        if key not in self.data:
            if required:
                self.problem("missing", key)
            return ""
        value: object = self.data[key]
        if not isinstance(value, str):
            self.problem(f"must be a string, not {_kind(value)}", key)
            return ""
        if nonempty and not value:
            self.problem("must not be empty", key)
        return value

    def integer(self, key: str, bounds: tuple[int, int]) -> int:
        value = self.data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(f"must be an integer, not {_kind(value)}", key)
            return 0
        if not bounds[0] <= value <= bounds[1]:
            self.problem(f"{value} is out of range {bounds[0]}..{bounds[1]}", key)
            return 0
        return value

    def flag(self, key: str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            self.problem(f"must be true or false, not {_kind(value)}", key)
            return False
        return value

    def texts(self, key: str) -> list[str]:
        value = self.data.get(key, [])
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(f"must be a list, not {_kind(value)}", key)
            return []
        result: list[str] = []
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, str | int):
                self.problem(f"must be a string, not {_kind(item)}", f"{key}[{index}]")
            else:
                result.append(str(item))
        return result

    def refs(self, key: str, known: Mapping[str, Any], what: str) -> list[Any]:
        """The entries a list of names refers to, in order."""
        found = []
        for name in self.texts(key):
            if name in known:
                found.append(known[name])
            else:
                self.problem(f"no {what} named {name!r}", key)
        return found

    def ref(self, key: str, known: Mapping[str, Any], what: str) -> Any:
        name = self.text(key, required=True, nonempty=True)
        if name and name not in known:
            self.problem(f"no {what} named {name!r}", key)
        return known.get(name)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _entries(
    data: Mapping[str, Any],
    section: str,
    allowed: tuple[str, ...],
    problems: list[str],
    build: Callable[[_Entry], Any],
) -> dict[str, Any]:
    """The section's entries by name (insertion order), each built from its _Entry."""
    raw = data.get(section)
    if isinstance(raw, Mapping) and set(raw) == {"items"}:
        raw = raw["items"]  # Meridio's ConfigMap shape
    if raw is None:
        return {}
    if not isinstance(raw, list):
        problems.append(f"{section}: must be a list, not {_kind(raw)}")
        return {}
    built: dict[str, Any] = {}
    for index, item in enumerate(raw):
        entry = _Entry(f"{section}[{index}]", item, ("name", *allowed), problems)
        name = entry.name = entry.text("name", required=True, nonempty=True)
        if name in built:
            entry.problem(f"duplicate name {name!r}", "name")
        value = build(entry)
        if name and name not in built:
            built[name] = value
    return built


def build_config(data: Any) -> NspConfig:
    """Validate loaded data and build the messages; ConfigFileError lists every problem."""
    if data is None:
        return NspConfig()
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise ConfigFileError([f"the file must hold a mapping, not {_kind(data)}"])
    for key in data:
        if key not in _SECTIONS:
            problems.append(f"unknown section {key!r} (expected one of: {', '.join(_SECTIONS)})")

    trench: Trench | None = None
    if data.get("trench") is not None:
        entry = _Entry("trench", data["trench"], ("name",), problems)
        name = entry.text("name", required=True, nonempty=True)
        trench = Trench(name=name) if name else None
    trenches = {trench.name: trench} if trench is not None else {}

    vips = _entries(
        data,
        "vips",
        ("address", "trench"),
        problems,
        lambda e: Vip(
            name=e.name,
            address=e.text("address", required=True),  # verbatim: see the module docstring
            trench=e.ref("trench", trenches, "trench"),
        ),
    )

    def port_nat(entry: _Entry, index: int, item: Any) -> Conduit.PortNat:
        nat = _Entry(
            f"{entry.where}.destination-port-nats[{index}]",
            item,
            ("port", "target-port", "protocol", "vips"),
            problems,
        )
        return Conduit.PortNat(
            port=nat.integer("port", _PORT),
            targetPort=nat.integer("target-port", _PORT),
            protocol=nat.text("protocol"),
            vips=nat.refs("vips", vips, "vip"),
        )

    def conduit(entry: _Entry) -> Conduit:
        nats = entry.data.get("destination-port-nats") or []
        if not isinstance(nats, list):
            entry.problem(f"must be a list, not {_kind(nats)}", "destination-port-nats")
            nats = []
        return Conduit(
            name=entry.name,
            trench=entry.ref("trench", trenches, "trench"),
            destinationPortNats=[port_nat(entry, i, item) for i, item in enumerate(nats)],
        )

    conduits = _entries(data, "conduits", ("trench", "destination-port-nats"), problems, conduit)
    streams = _entries(
        data,
        "streams",
        ("conduit", "max-targets"),
        problems,
        lambda e: Stream(
            name=e.name,
            conduit=e.ref("conduit", conduits, "conduit"),
            maxTargets=e.integer("max-targets", _UINT32),
        ),
    )
    flows = _entries(
        data,
        "flows",
        (
            "stream",
            "vips",
            "source-subnets",
            "destination-port-ranges",
            "source-port-ranges",
            "protocols",
            "priority",
            "byte-matches",
        ),
        problems,
        lambda e: Flow(
            name=e.name,
            stream=e.ref("stream", streams, "stream"),
            vips=e.refs("vips", vips, "vip"),
            sourceSubnets=e.texts("source-subnets"),
            destinationPortRanges=e.texts("destination-port-ranges"),
            sourcePortRanges=e.texts("source-port-ranges"),
            protocols=e.texts("protocols"),
            priority=e.integer("priority", _INT32),
            byteMatches=e.texts("byte-matches"),
        ),
    )
    gateways = _entries(
        data,
        "gateways",
        (
            "trench",
            "address",
            "ip-family",
            "protocol",
            "remote-asn",
            "local-asn",
            "remote-port",
            "local-port",
            "hold-time",
            "bfd",
            "min-tx",
            "min-rx",
            "multiplier",
            "bgp-auth",
        ),
        problems,
        lambda e: _gateway(e, trenches),
    )
    attractors = _entries(
        data,
        "attractors",
        ("trench", "vips", "gateways"),
        problems,
        lambda e: Attractor(
            name=e.name,
            trench=e.ref("trench", trenches, "trench"),
            vips=e.refs("vips", vips, "vip"),
            gateways=e.refs("gateways", gateways, "gateway"),
        ),
    )
    if problems:
        raise ConfigFileError(problems)
    return NspConfig(
        trench=trench,
        conduits=tuple(conduits.values()),
        streams=tuple(streams.values()),
        flows=tuple(flows.values()),
        vips=tuple(vips.values()),
        attractors=tuple(attractors.values()),
        gateways=tuple(gateways.values()),
    )


def _gateway(entry: _Entry, trenches: Mapping[str, Trench]) -> Gateway:
    gateway = Gateway(
        name=entry.name,
        trench=entry.ref("trench", trenches, "trench"),
        address=entry.text("address"),  # verbatim, as VIP addresses
        ipFamily=entry.text("ip-family"),
        protocol=entry.text("protocol"),
        remoteASN=entry.integer("remote-asn", _UINT32),
        localASN=entry.integer("local-asn", _UINT32),
        remotePort=entry.integer("remote-port", _PORT),
        localPort=entry.integer("local-port", _PORT),
        holdTime=entry.integer("hold-time", _UINT32),
        bfd=entry.flag("bfd"),
    )
    bfd_spec = Gateway.BfdSpec(
        MinTx=entry.integer("min-tx", _UINT32),
        MinRx=entry.integer("min-rx", _UINT32),
        Multiplier=entry.integer("multiplier", _UINT32),
    )
    if gateway.bfd:  # as upstream: the spec only travels with bfd on
        gateway.bfdSpec.CopyFrom(bfd_spec)
    if "bgp-auth" in entry.data:
        auth = _Entry(
            f"{entry.where}.bgp-auth",
            entry.data["bgp-auth"],
            ("key-name", "key-source"),
            entry.problems,
        )
        gateway.bgpAuth.CopyFrom(
            Gateway.BgpAuth(keyName=auth.text("key-name"), keySource=auth.text("key-source"))
        )
    return gateway


# -- Meridio's watch filters (api/nsp/v1/filter.go) ------------------------------------------------
#
# The request of a Watch is a filter: an empty name matches any name, an absent parent matches
# any parent, and a present parent is matched the same way, recursively.


def trench_matches(pattern: Trench, trench: Trench) -> bool:
    return not pattern.name or pattern.name == trench.name


def conduit_matches(pattern: Conduit, conduit: Conduit) -> bool:
    return (not pattern.name or pattern.name == conduit.name) and (
        not pattern.HasField("trench") or trench_matches(pattern.trench, conduit.trench)
    )


def stream_matches(pattern: Stream, stream: Stream) -> bool:
    return (not pattern.name or pattern.name == stream.name) and (
        not pattern.HasField("conduit") or conduit_matches(pattern.conduit, stream.conduit)
    )


def flow_matches(pattern: Flow, flow: Flow) -> bool:
    return (not pattern.name or pattern.name == flow.name) and (
        not pattern.HasField("stream") or stream_matches(pattern.stream, flow.stream)
    )


def vip_matches(pattern: Vip, vip: Vip) -> bool:
    return (not pattern.name or pattern.name == vip.name) and (
        not pattern.HasField("trench") or trench_matches(pattern.trench, vip.trench)
    )


def attractor_matches(pattern: Attractor, attractor: Attractor) -> bool:
    return (not pattern.name or pattern.name == attractor.name) and (
        not pattern.HasField("trench") or trench_matches(pattern.trench, attractor.trench)
    )


def gateway_matches(pattern: Gateway, gateway: Gateway) -> bool:
    return (not pattern.name or pattern.name == gateway.name) and (
        not pattern.HasField("trench") or trench_matches(pattern.trench, gateway.trench)
    )
