"""The lab NSP: `nsp.v1.ConfigurationManager` serving one trench's configuration from a file.

The file (YAML or JSON; format, example and what is validated: `proxy.lab.nsp_config`) looks like

    trench: {name: trench-a}
    conduits: [{name: conduit-a, trench: trench-a}]
    vips:
      - {name: vip-v4, address: 198.19.0.1/32, trench: trench-a}
      - {name: vip-v6, address: "2001:db8:ff::1/128", trench: trench-a}

Every Watch method is served, with Meridio's semantics (wire-api §4.5): the request is a filter
(an empty name or an absent parent matches anything); the stream sends the full filtered list at
once, then the full filtered list again whenever that kind's section of the configuration
changes (not deltas; as upstream, a change elsewhere in the section repeats an unchanged list).
WatchTrench sends `TrenchResponse{trench}`, without a trench when the filter does not match.

The file is polled (stat: mtime, size, inode; every `poll_interval`). A changed file is parsed;
a valid one replaces the configuration and every watcher gets its new list; an invalid one (or a
missing file) is logged once and the last good configuration stays. Replacing the file by
rename is atomic; an in-place write may be seen half-written (logged as invalid, then picked up
complete at the next poll). A file changed twice within the filesystem's timestamp granularity
without changing size is still noticed: a file modified in the last two seconds is re-read.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import attrs
import trio
from loguru import logger

from proxy.api.nsp.v1.configurationmanager_grpc import ConfigurationManagerServicer as _Base
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
from proxy.lab.listen import serve_with_tasks
from proxy.lab.nsp_config import (
    ConfigFileError,
    NspConfig,
    attractor_matches,
    conduit_matches,
    flow_matches,
    gateway_matches,
    parse_config,
    stream_matches,
    trench_matches,
    vip_matches,
)
from proxy.rpc import Address, CallContext
from proxy.security.tls import SpiffeTls
from proxy.watched import Watched

DEFAULT_POLL_INTERVAL = 0.5
_RACY_SECONDS = 2.0  # a file this recently modified is re-read even if its stat looks unchanged

S = TypeVar("S")
R = TypeVar("R")


# -- the file --------------------------------------------------------------------------------------


@attrs.frozen
class FileState:
    """What a poll compares: a change of any of these means "read it again"."""

    inode: int
    size: int
    mtime_ns: int


def _state(stat: os.stat_result) -> FileState:
    return FileState(stat.st_ino, stat.st_size, stat.st_mtime_ns)


def load_file(path: str) -> tuple[NspConfig, FileState, bytes]:
    """Read and validate the file (at start: a problem is the caller's to report)."""
    try:
        with open(path, "rb") as file:
            state = _state(os.fstat(file.fileno()))
            content = file.read()
    except OSError as exc:
        raise ConfigFileError([f"cannot read {path}: {exc.strerror}"]) from None
    return _parse(content), state, content


def _parse(content: bytes) -> NspConfig:
    try:
        text = content.decode()
    except UnicodeDecodeError:
        raise ConfigFileError(["not UTF-8 text"]) from None
    return parse_config(text)


class ConfigFile:
    """Polls the file and publishes each new valid configuration in `config`."""

    def __init__(self, path: str, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        self.path = path
        self.poll_interval = poll_interval
        initial, self._state, self._content = load_file(path)
        self.config = Watched(initial)
        self._reported: str | None = None  # the last problem logged, not to repeat it

    async def poll(self) -> NoReturn:
        while True:
            await trio.sleep(self.poll_interval)
            await self.check()

    async def check(self) -> None:
        """Look at the file once; publish it if it changed and is valid."""
        path = trio.Path(self.path)
        try:
            state = _state(await path.stat())
            if state == self._state and time.time() - state.mtime_ns / 1e9 > _RACY_SECONDS:
                return
            content = await path.read_bytes()
        except OSError as exc:
            self._report_once(str(exc.strerror), "configuration file unreadable, last good kept")
            return
        self._state = state
        if content == self._content:
            self._reported = None
            return
        try:
            config = _parse(content)
        except ConfigFileError as exc:
            self._report_once(
                exc, "configuration file invalid, last good kept", problems=exc.problems
            )
            return
        self._content = content
        self._reported = None
        if config != self.config.value:
            self.config.set(config)
            logger.info("configuration loaded", path=self.path, **config.summary())

    def _report_once(self, problem: object, message: str, **context: Any) -> None:
        key = str(problem)
        if key == self._reported:
            return
        self._reported = key
        logger.error(message, path=self.path, reason=key, **context)


# -- the service -----------------------------------------------------------------------------------


class ConfigurationManagerServicer(_Base):  # type: ignore[misc]  # untyped generated base
    """Each Watch returns one async generator (`_watch`) over the shared configuration."""

    def __init__(self, config: Watched[NspConfig]) -> None:
        self._config = config

    async def _watch(
        self, section: Callable[[NspConfig], S], respond: Callable[[S], R]
    ) -> AsyncIterator[R]:
        """The response for the section now, then each time the section changes
        (level-triggered: a client slower than the file sees the latest, not every, state)."""
        config = self._config.value
        sent = section(config)
        yield respond(sent)
        while True:
            config = await self._config.wait_change(config)
            current = section(config)
            if current != sent:
                sent = current
                yield respond(current)

    def WatchTrench(self, message: Trench, request: CallContext) -> AsyncIterator[TrenchResponse]:
        def respond(trench: Trench | None) -> TrenchResponse:
            if trench is not None and trench_matches(message, trench):
                return TrenchResponse(trench=trench)
            return TrenchResponse()

        return self._watch(lambda config: config.trench, respond)

    def WatchConduit(
        self, message: Conduit, request: CallContext
    ) -> AsyncIterator[ConduitResponse]:
        return self._watch(
            lambda config: config.conduits,
            lambda items: ConduitResponse(
                conduits=[item for item in items if conduit_matches(message, item)]
            ),
        )

    def WatchStream(self, message: Stream, request: CallContext) -> AsyncIterator[StreamResponse]:
        return self._watch(
            lambda config: config.streams,
            lambda items: StreamResponse(
                streams=[item for item in items if stream_matches(message, item)]
            ),
        )

    def WatchFlow(self, message: Flow, request: CallContext) -> AsyncIterator[FlowResponse]:
        return self._watch(
            lambda config: config.flows,
            lambda items: FlowResponse(
                flows=[item for item in items if flow_matches(message, item)]
            ),
        )

    def WatchVip(self, message: Vip, request: CallContext) -> AsyncIterator[VipResponse]:
        logger.debug("vip watch", peer=request.peer.address, filter=_filter_text(message))
        return self._watch(
            lambda config: config.vips,
            lambda items: VipResponse(vips=[item for item in items if vip_matches(message, item)]),
        )

    def WatchAttractor(
        self, message: Attractor, request: CallContext
    ) -> AsyncIterator[AttractorResponse]:
        return self._watch(
            lambda config: config.attractors,
            lambda items: AttractorResponse(
                attractors=[item for item in items if attractor_matches(message, item)]
            ),
        )

    def WatchGateway(
        self, message: Gateway, request: CallContext
    ) -> AsyncIterator[GatewayResponse]:
        return self._watch(
            lambda config: config.gateways,
            lambda items: GatewayResponse(
                gateways=[item for item in items if gateway_matches(message, item)]
            ),
        )


def _filter_text(message: Any) -> str:
    return " ".join(str(message).split()) or "(any)"


async def serve_nsp(
    address: Address,
    config_path: str,
    *,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    tls: SpiffeTls | None = None,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the configuration in `config_path` and follow its changes until cancelled;
    `nursery.start` returns the address bound. ConfigFileError (file missing or invalid at
    start) and OSError (cannot listen) are raised from `nursery.start`."""
    source = ConfigFile(config_path, poll_interval)
    await serve_with_tasks(
        "nsp",
        [ConfigurationManagerServicer(source.config)],
        address,
        [source.poll],
        context={"path": config_path, **source.config.value.summary()},
        tls=tls,
        task_status=task_status,
    )
