"""The lab NSP over the wire, with grpcio as the client.

The server runs in this trio run with a short poll (or as the real CLI in a subprocess). Each
grpcio stream is pumped by a thread into a trio channel, so a test can wait for the next message
with a deadline, or check that none comes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import grpc
import pytest
import trio
from loguru import logger

from proxy.api.nsp.v1.configurationmanager_pb2 import (
    AttractorResponse,
    ConduitResponse,
    FlowResponse,
    GatewayResponse,
    StreamResponse,
    TrenchResponse,
    VipResponse,
)
from proxy.api.nsp.v1.model_pb2 import Attractor, Conduit, Flow, Gateway, Stream, Trench, Vip
from proxy.lab.nsp import serve_nsp
from proxy.lab.nsp_config import ConfigFileError
from proxy.rpc import UnixAddress
from tests.integration.grpcio_stream import pumped
from tests.integration.lab_process import lab_process

pytestmark = pytest.mark.timeout(30)

POLL = 0.05
SERVICE = "/nsp.v1.ConfigurationManager"
RESPONSES: dict[str, Any] = {
    "WatchTrench": TrenchResponse,
    "WatchConduit": ConduitResponse,
    "WatchStream": StreamResponse,
    "WatchFlow": FlowResponse,
    "WatchVip": VipResponse,
    "WatchAttractor": AttractorResponse,
    "WatchGateway": GatewayResponse,
}
VIPS = {
    "vip-v4": "198.19.0.1/32",
    "vip-v6": "2001:db8:ff::1/128",
    "vip-garbage": "not-an-address",  # passed through verbatim: the proxy must cope
}


@pytest.fixture
def workdir() -> Iterator[str]:
    # short: the unix socket lives here too (107 bytes at most)
    path = tempfile.mkdtemp(dir="/tmp", prefix="nsp-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def errors() -> Iterator[list[str]]:
    """The ERROR log lines (message and context) emitted during the test."""
    lines: list[str] = []
    sink = logger.add(
        lambda message: lines.append(f"{message.record['message']} {message.record['extra']}"),
        level="ERROR",
    )
    try:
        yield lines
    finally:
        logger.remove(sink)


def trench_config(
    vips: dict[str, str] = VIPS, conduits: tuple[str, ...] = ("conduit-a",)
) -> dict[str, Any]:
    return {
        "trench": {"name": "trench-a"},
        "conduits": [{"name": name, "trench": "trench-a"} for name in conduits],
        "streams": [{"name": "stream-a", "conduit": conduits[0], "max-targets": 10}],
        "flows": [
            {
                "name": "flow-a",
                "stream": "stream-a",
                "vips": sorted(vips)[:1],
                "protocols": ["tcp"],
                "destination-port-ranges": ["80"],
            }
        ],
        "vips": [
            {"name": name, "address": address, "trench": "trench-a"}
            for name, address in vips.items()
        ],
        "attractors": [{"name": "attractor-a", "trench": "trench-a", "vips": sorted(vips)}],
        "gateways": [{"name": "gateway-a", "trench": "trench-a", "address": "198.19.255.1"}],
    }


def write(path: str, content: dict[str, Any] | str) -> None:
    """Replace the file atomically (rename), as a careful editor or `kubectl` would."""
    text = content if isinstance(content, str) else json.dumps(content)
    with open(f"{path}.tmp", "w") as file:
        file.write(text)
    os.replace(f"{path}.tmp", path)


def rewrite_in_place(path: str, content: dict[str, Any]) -> tuple[os.stat_result, os.stat_result]:
    """Overwrite the file in place and put its mtime back; the stat before and after."""
    before = os.stat(path)
    with open(path, "r+") as file:
        file.write(json.dumps(content))
        file.truncate()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return before, os.stat(path)


def vip_list(response: VipResponse) -> list[tuple[str, str, str]]:
    return [(vip.name, vip.address, vip.trench.name) for vip in response.vips]


def expected_vips(vips: dict[str, str]) -> list[tuple[str, str, str]]:
    return [(name, address, "trench-a") for name, address in vips.items()]


@asynccontextmanager
async def nsp_server(
    path: str, config: dict[str, Any] | str, poll: float = POLL
) -> AsyncIterator[tuple[str, grpc.Channel]]:
    """The NSP serving `config` (written to a file) in this run; (file path, grpcio channel)."""
    config_path = f"{os.path.dirname(path)}/trench.conf"
    write(config_path, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_nsp, UnixAddress(path), config_path, poll_interval=poll))
        channel = grpc.insecure_channel(f"unix://{path}")
        try:
            yield config_path, channel
        finally:
            channel.close()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def watch(
    channel: grpc.Channel, method: str, request: Any
) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
    """A grpcio server stream, its messages delivered to a trio channel by a pumping thread."""
    call = channel.unary_stream(
        f"{SERVICE}/{method}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=RESPONSES[method].FromString,
    )
    stream = call(request, timeout=25)
    async with pumped(stream, send_error=False) as messages:  # an error just ends the stream
        yield messages


async def next_message(messages: trio.MemoryReceiveChannel[Any], within: float = 2.0) -> Any:
    with trio.fail_after(within):
        return await messages.receive()


async def no_message(messages: trio.MemoryReceiveChannel[Any], during: float) -> None:
    with trio.move_on_after(during):
        message = await messages.receive()
        pytest.fail(f"unexpected message: {message}")


# -- WatchVip ------------------------------------------------------------------------------------


async def test_watch_vip_sends_the_full_list_then_every_new_full_list(workdir: str) -> None:
    async with nsp_server(f"{workdir}/nsp.sock", trench_config()) as (config, channel):
        request = Vip(trench=Trench(name="trench-a"))  # what the proxy sends
        async with watch(channel, "WatchVip", request) as messages:
            assert vip_list(await next_message(messages)) == expected_vips(VIPS)
            changed = {"vip-v4": "198.19.0.2/32", "vip-new": "198.19.0.3/32"}
            write(config, trench_config(changed))
            start = time.monotonic()
            assert vip_list(await next_message(messages, within=1.0)) == expected_vips(changed)
            print(f"change seen after {time.monotonic() - start:.3f} s (poll {POLL} s)")
            write(config, trench_config({}))
            assert vip_list(await next_message(messages, within=1.0)) == []


async def test_vip_filters_are_wildcards_when_empty(workdir: str) -> None:
    all_vips = expected_vips(VIPS)
    filters = {
        "everything": (Vip(), all_vips),
        "trench present but nameless": (Vip(trench=Trench()), all_vips),
        "own trench": (Vip(trench=Trench(name="trench-a")), all_vips),
        "another trench": (Vip(trench=Trench(name="trench-b")), []),
        "by name": (Vip(name="vip-v6"), [("vip-v6", VIPS["vip-v6"], "trench-a")]),
        "by name and trench": (Vip(name="vip-v6", trench=Trench(name="trench-b")), []),
    }
    async with nsp_server(f"{workdir}/nsp.sock", trench_config()) as (config, channel):
        for case, (request, expected) in filters.items():
            async with watch(channel, "WatchVip", request) as messages:
                assert vip_list(await next_message(messages)) == expected, case
        # a change of any VIP sends every VIP watcher its list again, as upstream
        async with watch(channel, "WatchVip", Vip(name="vip-v6")) as messages:
            await next_message(messages)
            write(config, trench_config({**VIPS, "vip-v4": "198.19.0.9/32"}))
            assert vip_list(await next_message(messages, within=1.0)) == [
                ("vip-v6", VIPS["vip-v6"], "trench-a")
            ]


async def test_an_invalid_file_is_logged_once_and_the_last_good_one_kept(
    workdir: str, errors: list[str]
) -> None:
    async with (
        nsp_server(f"{workdir}/nsp.sock", trench_config()) as (config, channel),
        watch(channel, "WatchVip", Vip()) as messages,
    ):
        assert vip_list(await next_message(messages)) == expected_vips(VIPS)

        write(config, '{"vips": [')  # not JSON (nor YAML)
        await no_message(messages, during=10 * POLL)
        assert len(errors) == 1 and "configuration file invalid" in errors[0]

        unknown_trench = trench_config()
        unknown_trench["vips"][0]["trench"] = "trench-b"
        write(config, unknown_trench)
        await no_message(messages, during=10 * POLL)
        assert len(errors) == 2
        assert "vips[0].trench: no trench named 'trench-b'" in errors[1]

        os.unlink(config)
        await no_message(messages, during=10 * POLL)
        assert len(errors) == 3 and "unreadable" in errors[2]

        async with watch(channel, "WatchVip", Vip()) as late:  # a new watcher: last good
            assert vip_list(await next_message(late)) == expected_vips(VIPS)

        fixed = {"vip-v4": "198.19.0.7/32"}
        write(config, trench_config(fixed))
        assert vip_list(await next_message(messages, within=1.0)) == expected_vips(fixed)
        assert len(errors) == 3


async def test_a_same_size_rewrite_with_the_same_mtime_is_noticed(workdir: str) -> None:
    # Same inode, same size, and the same mtime, as two writes within the filesystem's
    # timestamp granularity give (simulated by putting the mtime back): still seen, because a
    # recently modified file is read again.
    initial = trench_config({"vip-v4": "198.19.0.1/32"})
    async with (
        nsp_server(f"{workdir}/nsp.sock", initial) as (config, channel),
        watch(channel, "WatchVip", Vip(name="vip-v4")) as messages,
    ):
        await next_message(messages)
        for last_digit in "234":
            before, after = rewrite_in_place(
                config, trench_config({"vip-v4": f"198.19.0.{last_digit}/32"})
            )
            assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
                before.st_ino,
                before.st_size,
                before.st_mtime_ns,
            )
            response = await next_message(messages, within=1.0)
            assert vip_list(response) == [("vip-v4", f"198.19.0.{last_digit}/32", "trench-a")]


# -- the other Watch methods ---------------------------------------------------------------------


async def test_watch_trench_and_watch_conduit(workdir: str) -> None:
    async with nsp_server(f"{workdir}/nsp.sock", trench_config()) as (config, channel):
        async with watch(channel, "WatchTrench", Trench()) as messages:
            assert (await next_message(messages)).trench == Trench(name="trench-a")
        async with watch(channel, "WatchTrench", Trench(name="trench-b")) as messages:
            assert not (await next_message(messages)).HasField("trench")

        by_trench = Conduit(trench=Trench(name="trench-a"))
        async with watch(channel, "WatchConduit", by_trench) as conduits:
            response = await next_message(conduits)
            assert [(c.name, c.trench.name) for c in response.conduits] == [
                ("conduit-a", "trench-a")
            ]
            write(config, trench_config(conduits=("conduit-a", "conduit-b")))
            response = await next_message(conduits, within=1.0)
            assert [c.name for c in response.conduits] == ["conduit-a", "conduit-b"]
        async with watch(channel, "WatchConduit", Conduit(name="conduit-b")) as conduits:
            assert [c.name for c in (await next_message(conduits)).conduits] == ["conduit-b"]
        other_trench = Conduit(trench=Trench(name="trench-b"))
        async with watch(channel, "WatchConduit", other_trench) as conduits:
            assert list((await next_message(conduits)).conduits) == []


async def test_streams_flows_attractors_and_gateways_carry_their_parents(workdir: str) -> None:
    async with nsp_server(f"{workdir}/nsp.sock", trench_config()) as (_, channel):
        by_conduit = Stream(conduit=Conduit(name="conduit-a"))
        async with watch(channel, "WatchStream", by_conduit) as messages:
            (stream,) = (await next_message(messages)).streams
            assert (stream.name, stream.maxTargets, stream.conduit.trench.name) == (
                "stream-a",
                10,
                "trench-a",
            )
        by_trench = Flow(stream=Stream(conduit=Conduit(trench=Trench(name="trench-a"))))
        async with watch(channel, "WatchFlow", by_trench) as messages:
            (flow,) = (await next_message(messages)).flows
            assert (flow.name, flow.stream.name, list(flow.protocols)) == (
                "flow-a",
                "stream-a",
                ["tcp"],
            )
            assert [vip.address for vip in flow.vips] == [VIPS["vip-garbage"]]
        async with watch(channel, "WatchAttractor", Attractor()) as messages:
            (attractor,) = (await next_message(messages)).attractors
            assert sorted(vip.name for vip in attractor.vips) == sorted(VIPS)
        async with watch(channel, "WatchGateway", Gateway(name="nope")) as messages:
            assert list((await next_message(messages)).gateways) == []


async def test_yaml_with_meridio_items_lists(workdir: str) -> None:
    text = """
trench:
  name: trench-a
conduits:
  items:
    - name: conduit-a
      trench: trench-a
vips:
  items:
    - {name: vip-v6, address: "2001:db8:ff::1/128", trench: trench-a}
"""
    async with (
        nsp_server(f"{workdir}/nsp.sock", text) as (_, channel),
        watch(channel, "WatchVip", Vip()) as messages,
    ):
        assert vip_list(await next_message(messages)) == [
            ("vip-v6", "2001:db8:ff::1/128", "trench-a")
        ]


async def test_an_invalid_file_at_start_is_refused(workdir: str) -> None:
    config_path = f"{workdir}/trench.conf"
    write(config_path, {"vips": [{"name": "v", "address": "198.19.0.1/32", "trench": "x"}]})
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConfigFileError, match=r"vips\[0\]\.trench: no trench named 'x'"):
            await nursery.start(serve_nsp, UnixAddress(f"{workdir}/nsp.sock"), config_path)
    assert not await trio.Path(f"{workdir}/nsp.sock").exists()


# -- the real command ----------------------------------------------------------------------------


async def test_cli_serves_until_sigterm_and_removes_its_socket(workdir: str) -> None:
    path = f"{workdir}/nsp.sock"
    config_path = f"{workdir}/trench.json"
    write(config_path, trench_config())
    args = ["nsp", "--listen", f"unix://{path}", "--config", config_path, "--poll", "100ms"]
    async with lab_process(args, b"serving service=nsp") as nsp:
        channel = grpc.insecure_channel(f"unix://{path}")
        try:
            async with watch(channel, "WatchVip", Vip(trench=Trench(name="trench-a"))) as vips:
                assert vip_list(await next_message(vips)) == expected_vips(VIPS)
                write(config_path, trench_config({"vip-v4": "198.19.0.5/32"}))
                response = await next_message(vips, within=2.0)
                assert vip_list(response) == expected_vips({"vip-v4": "198.19.0.5/32"})
        finally:
            channel.close()
        assert await nsp.stop() == 0
        assert not await trio.Path(path).exists()
        assert b"configuration loaded" in nsp.output and b"stopped service=nsp" in nsp.output
