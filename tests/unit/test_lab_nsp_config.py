"""The lab NSP's file format and Meridio's watch filters (pure: no files, no sockets)."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest

from proxy.api.nsp.v1.model_pb2 import Conduit, Flow, Stream, Trench, Vip
from proxy.lab import nsp_config
from proxy.lab.nsp_config import (
    ConfigFileError,
    NspConfig,
    build_config,
    conduit_matches,
    flow_matches,
    parse_config,
    vip_matches,
)


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigFileError) as caught:
        build_config(data)
    return caught.value.problems


def test_the_documented_example_is_valid() -> None:
    doc = nsp_config.__doc__ or ""
    example = doc[doc.index("    trench:\n") : doc.index("What is checked")]
    config = parse_config(textwrap.dedent(example))
    assert config.summary() == {
        "trench": "trench-a",
        "conduits": 1,
        "streams": 1,
        "flows": 1,
        "vips": 2,
        "attractors": 1,
        "gateways": 1,
    }
    (flow,) = config.flows
    assert flow.stream.conduit.trench.name == "trench-a"  # parents resolved, as upstream
    assert [vip.address for vip in flow.vips] == ["198.19.0.1/32", "2001:db8:ff::1/128"]
    (conduit,) = config.conduits
    assert conduit.destinationPortNats[0].vips[0].name == "vip-v4"
    (gateway,) = config.gateways
    assert (gateway.bfd, gateway.bfdSpec.MinTx, gateway.bgpAuth.keyName) == (True, 300, "key-a")


def test_json_and_an_empty_file() -> None:
    data = {"trench": {"name": "t"}, "vips": [{"name": "v", "address": "x", "trench": "t"}]}
    assert [vip.address for vip in parse_config(json.dumps(data)).vips] == ["x"]
    assert build_config(None) == NspConfig()


@pytest.mark.parametrize("address", ["not-an-address", "198.19.0.1", "", "300.1.1.1/32"])
def test_vip_addresses_are_passed_through_verbatim(address: str) -> None:
    data = {"trench": {"name": "t"}, "vips": [{"name": "v", "address": address, "trench": "t"}]}
    assert build_config(data).vips[0].address == address


def test_structure_problems_are_all_reported() -> None:
    found = problems(
        {
            "trench": {"name": "t"},
            "vipz": [],
            "vips": [
                {"name": "a", "adress": "198.19.0.1/32", "trench": "t"},
                {"name": "a", "address": 1, "trench": "t"},
                {"address": "198.19.0.2/32", "trench": "other"},
            ],
            "conduits": [{"name": "c", "trench": "t"}],
            "streams": [{"name": "s", "conduit": "nope", "max-targets": -1}],
            "flows": [{"name": "f", "stream": "s", "vips": ["a", "missing"], "priority": True}],
            "gateways": [{"name": "g", "trench": "t", "bfd": "yes", "local-port": 70000}],
        }
    )
    assert problems_text(found) == [
        "unknown section 'vipz'",
        "vips[0]: unknown key 'adress'",
        "vips[0].address: missing",
        "vips[1].name: duplicate name 'a'",
        "vips[1].address: must be a string, not int",
        "vips[2].name: missing",
        "vips[2].trench: no trench named 'other'",
        "streams[0].conduit: no conduit named 'nope'",
        "streams[0].max-targets: -1 is out of range",
        "flows[0].vips: no vip named 'missing'",
        "flows[0].priority: must be an integer, not bool",
        "gateways[0].local-port: 70000 is out of range",
        "gateways[0].bfd: must be true or false, not str",
    ]


def problems_text(found: list[str]) -> list[str]:
    """Each problem up to its explanation in parentheses or its range numbers."""
    return [text.split(" (")[0].split(" 0..")[0] for text in found]


def test_a_reference_needs_the_files_trench() -> None:
    assert problems({"conduits": [{"name": "c", "trench": "t"}]}) == [
        "conduits[0].trench: no trench named 't'"
    ]
    assert problems([]) == ["the file must hold a mapping, not list"]


def test_meridio_items_lists_are_accepted() -> None:
    data = {"trench": {"name": "t"}, "conduits": {"items": [{"name": "c", "trench": "t"}]}}
    assert [conduit.name for conduit in build_config(data).conduits] == ["c"]


def test_filters_follow_meridio() -> None:
    vip = Vip(name="v", address="198.19.0.1/32", trench=Trench(name="t"))
    assert vip_matches(Vip(), vip)
    assert vip_matches(Vip(trench=Trench()), vip)  # present parent, empty name: any
    assert vip_matches(Vip(name="v", trench=Trench(name="t")), vip)
    assert not vip_matches(Vip(name="w"), vip)
    assert not vip_matches(Vip(trench=Trench(name="u")), vip)

    conduit = Conduit(name="c", trench=Trench(name="t"))
    flow = Flow(name="f", stream=Stream(name="s", conduit=conduit))
    assert conduit_matches(Conduit(trench=Trench(name="t")), conduit)
    assert flow_matches(Flow(stream=Stream(conduit=Conduit(name="c"))), flow)
    assert not flow_matches(Flow(stream=Stream(conduit=Conduit(trench=Trench(name="u")))), flow)
