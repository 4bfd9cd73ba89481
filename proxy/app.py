"""The supervisor: one nursery holding the proxy's tasks, and the process's signals.

Signals (behaviour reference §7.3, with Python's defaults tamed: SIGUSR1/2 would kill it):

  SIGTERM, SIGINT, SIGQUIT  stop: cancel every task, run their cleanups within NSM_SHUTDOWN_TIMEOUT
  SIGHUP                    re-read the configuration; apply what can change, log what cannot
  SIGUSR1                   log level back to the configured NSM_LOG_LEVEL
  SIGUSR2                   log level TRACE

Today the nursery holds the health servers; the control plane and the dataplane join it in later
issues, each as a task that owns its state.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import attrs
import trio
from loguru import logger

from proxy import log
from proxy.config import METADATA_KEY, Config, ConfigError, describe
from proxy.health import Health, HealthServicer
from proxy.rpc import Server, TcpAddress, UnixAddress, parse_address

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
HANDLED_SIGNALS = STOP_SIGNALS | {signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
EXIT_OK, EXIT_FATAL = 0, 1
HEALTH_SOCKET_MODE = 0o666  # probes may run as another user in the pod; it only tells health


def changed_settings(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """The variables that differ, split into (applied at runtime, needing a restart)."""
    applied: list[str] = []
    restart: list[str] = []
    for field in attrs.fields(Config):
        if getattr(old, field.name) == getattr(new, field.name):
            continue
        var = field.metadata[METADATA_KEY]
        (applied if var.reloadable else restart).append(var.env)
    return applied, restart


class Supervisor:
    def __init__(self, config: Config, load_config: Callable[[], Config]) -> None:
        self.config = config
        self._load_config = load_config
        self.health = Health()

    async def run(self) -> int:
        """Serve until a stop signal; the exit status."""
        with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    await self._start_health(nursery)
                except OSError as exc:
                    logger.error("cannot serve health", reason=str(exc))
                    nursery.cancel_scope.cancel()
                    return EXIT_FATAL
                logger.info("started", health=self.config.health_address)
                stop = await self._handle_signals(signals)
                logger.info("stopping", signal=signal.Signals(stop).name)
                nursery.cancel_scope.cancel()
        logger.info("stopped")
        return EXIT_OK

    async def _start_health(self, nursery: trio.Nursery) -> None:
        server = Server([HealthServicer(self.health)])
        address = parse_address(self.config.health_address)
        assert isinstance(address, UnixAddress)  # config only accepts unix:// here
        await nursery.start(partial(server.serve_unix, address.path, mode=HEALTH_SOCKET_MODE))
        if self.config.health_tcp_address:
            tcp = parse_address(self.config.health_tcp_address)
            assert isinstance(tcp, TcpAddress)
            await nursery.start(server.serve_tcp, tcp.host or None, tcp.port)

    async def _handle_signals(self, signals: AsyncIterator[int]) -> int:
        """Act on signals until a stop signal arrives; return it."""
        async for signum in signals:
            if signum in STOP_SIGNALS:
                return signum
            if signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR1:
                log.set_level(self.config.log_level)
            elif signum == signal.SIGUSR2:
                log.set_level("TRACE")
        raise AssertionError("the signal receiver never ends")

    def _reload(self) -> None:
        try:
            new = self._load_config()
        except ConfigError as exc:
            for problem in exc.problems:
                logger.error("reload rejected, configuration kept", problem=problem)
            return
        applied, restart = changed_settings(self.config, new)
        if new.log_format != self.config.log_format:
            log.set_format(new.log_format)
        if new.log_level != self.config.log_level:
            log.set_level(new.log_level)
        if restart:
            logger.warning("changes need a restart to take effect", variables=",".join(restart))
        logger.info("configuration reloaded", applied=",".join(applied) or "nothing")
        # Keep the running values of what needs a restart, so SIGUSR1 etc. stay coherent.
        self.config = _keep_restart_fields(running=self.config, new=new)


def _keep_restart_fields(*, running: Config, new: Config) -> Config:
    """`new` with the running values of every variable that needs a restart."""
    kept: dict[str, Any] = {
        field.name: getattr(running, field.name)
        for field in attrs.fields(Config)
        if not field.metadata[METADATA_KEY].reloadable
    }
    return attrs.evolve(new, **kept)


def main(config: Config, load_config: Callable[[], Config]) -> int:
    """Run the proxy with a validated configuration; `load_config` re-reads it on SIGHUP."""
    log.setup(config.log_level, config.log_format)
    logger.info("configuration read", **describe(config))
    return trio.run(Supervisor(config, load_config).run)
