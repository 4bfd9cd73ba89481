"""The supervisor: one nursery holding the proxy's tasks, and the process's signals.

Signals (behaviour reference §7.3, with Python's defaults tamed: SIGUSR1/2 would kill it):

  SIGTERM, SIGINT, SIGQUIT  stop: cancel every task, run their cleanups within NSM_SHUTDOWN_TIMEOUT
  SIGHUP                    re-read the configuration; apply what can change, log what cannot
  SIGUSR1                   log level back to the configured NSM_LOG_LEVEL
  SIGUSR2                   log level TRACE

The tasks (design §2), each owning its state and talking through memory channels:

  health servers          grpc.health.v1 on NSM_HEALTH_ADDRESS (and NSM_HEALTH_TCP_ADDRESS)
  netlink worker, router  the kernel state (bridge, ports, egress, VIP rules), link monitor
  IPAM, NSP, NSM channels reconnecting, followed by the IPAMCli / NSPCli health
  bridge addresses        from IPAM, renewed -> router, and the endpoint's gateways
  VIP watch               NSP -> router
  discovery, mesh         the LB endpoints -> one connection task each -> router
  endpoint, registration  the targets' NSM endpoint on its own socket, registered in NSM
  endpoint probe          NSMEndpoint health; Egress follows the router (nexthops installed)

Stopping (SIGTERM): the control plane is cancelled and its cleanups run in parallel (endpoint
unregistered, LB connections closed), then pending IPAM releases are flushed, all within
NSM_SHUTDOWN_TIMEOUT; the kernel state stays for the next instance, which adopts it.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import attrs
import trio
from loguru import logger

from proxy import ipam, log, nsp, probe
from proxy.config import METADATA_KEY, Config, ConfigError, describe
from proxy.health import (
    EGRESS,
    IPAM_CLIENT,
    NSM_ENDPOINT,
    NSP_CLIENT,
    Health,
    HealthServicer,
    follow_channel,
)
from proxy.kernel.errors import KernelError
from proxy.kernel.monitor import LinkMonitor
from proxy.kernel.netlink import NetlinkWorker
from proxy.kernel.router import ConnectionsKnown, Router, RouterEvent
from proxy.kernel.settings import bridge_mac, prepare
from proxy.nsm.discovery import Discovery, LbEvent
from proxy.nsm.endpoint import TargetEndpoint
from proxy.nsm.hoptoken import Signer
from proxy.nsm.mesh import Mesh, MeshSettings, connection_key_prefix
from proxy.nsm.registration import Registration
from proxy.rpc import (
    Backoff,
    ReconnectingChannel,
    Server,
    TcpAddress,
    Tls,
    UnixAddress,
    parse_address,
)
from proxy.security.identity import start_identity
from proxy.security.tls import SpiffeTls
from proxy.shutdown import Shutdown

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
HANDLED_SIGNALS = STOP_SIGNALS | {signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
EXIT_OK, EXIT_FATAL = 0, 1
HEALTH_SOCKET_MODE = 0o666  # probes may run as another user in the pod; it only tells health
ROUTER_BUFFER = 1000
LB_BUFFER = 100
PROBE_INTERVAL, PROBE_BUDGET, PROBE_CONNECT_TIMEOUT = 5.0, 4.0, 1.0  # upstream's NSE probe


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
        self.shutdown = Shutdown(config.shutdown_timeout)

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
                nursery.start_soon(self._stop_on_signal, signals)
                status = await run_proxy(self.config, self.health, self.shutdown)
                nursery.cancel_scope.cancel()
        logger.info("stopped", status=status)
        return status

    async def _stop_on_signal(self, signals: AsyncIterator[int]) -> None:
        stop = await self._handle_signals(signals)
        budget = self.config.shutdown_timeout
        logger.info("stopping", signal=signal.Signals(stop).name, budget=budget)
        self.shutdown.begin()

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


async def run_proxy(config: Config, health: Health, shutdown: Shutdown) -> int:
    """Run the proxy until the stop begins; then stop it within the shutdown budget."""
    endpoint_dir = tempfile.mkdtemp(prefix=f"{config.name}-", dir="/tmp")
    try:
        async with trio.open_nursery() as kernel:
            worker = NetlinkWorker()
            await kernel.start(worker.run)
            try:
                with shutdown.until_stopping() as starting:
                    scope = await prepare(worker, config)
            except KernelError as exc:
                logger.error("cannot manage this network namespace", reason=str(exc))
                kernel.cancel_scope.cancel()
                return EXIT_FATAL
            if starting.cancelled_caught:
                kernel.cancel_scope.cancel()
                return EXIT_OK
            with shutdown.until_stopping() as waiting:
                tls = await start_identity(config, kernel)
            if waiting.cancelled_caught:
                kernel.cancel_scope.cancel()
                return EXIT_OK
            router_events, router_inbox = trio.open_memory_channel[RouterEvent](ROUTER_BUFFER)
            router = Router(worker, scope, bridge_mac(config), interval=config.reconcile_interval)
            await kernel.start(LinkMonitor(worker, router_events.clone()).run)
            await kernel.start(router.run, router_inbox)
            kernel.start_soon(follow_egress, router, health)
            ipam_channel = ipam.ipam_channel(config, tls.client() if tls else None)
            await kernel.start(ipam_channel.run)
            kernel.start_soon(follow_channel, ipam_channel, health, IPAM_CLIENT)
            addresses = ipam.IpamClient.from_config(config, ipam_channel)
            await kernel.start(addresses.run)
            with shutdown.until_stopping():
                await _control_plane(
                    config,
                    health,
                    shutdown,
                    router_events,
                    ipam_channel,
                    addresses,
                    endpoint_dir,
                    tls,
                )
            with shutdown.cleanup(config.shutdown_timeout):
                await addresses.flush()
            kernel.cancel_scope.cancel()
    finally:
        shutil.rmtree(endpoint_dir, ignore_errors=True)
    return EXIT_OK


async def _control_plane(
    config: Config,
    health: Health,
    shutdown: Shutdown,
    router: trio.MemorySendChannel[RouterEvent],
    ipam_channel: ReconnectingChannel,
    addresses: ipam.IpamClient,
    endpoint_dir: str,
    tls: SpiffeTls | None,
) -> None:
    """Everything that talks to IPAM, NSP and NSM (over mutual TLS with `tls`, plain text
    without); cancelled first when stopping."""
    backoff = Backoff(maximum=config.grpc_max_backoff)
    client_tls = tls.client() if tls else None
    # NSM's per-hop tokens, signed with the SVID's key (none in plain text).
    signer = Signer.of(tls, config.max_token_lifetime) if tls else None
    async with trio.open_nursery() as plane:
        nsp_channel = nsp.nsp_channel(config, client_tls)
        nsm_channel = ReconnectingChannel(
            config.connect_to,
            name="nsm",
            backoff=backoff,
            connect_timeout=config.dial_timeout,
            ssl_context=client_tls,
        )
        for channel in (nsp_channel, nsm_channel):
            await plane.start(channel.run)
        plane.start_soon(follow_channel, nsp_channel, health, NSP_CLIENT)
        await plane.start(
            nsp.VipWatch(nsp_channel, config.trench, max_backoff=config.grpc_max_backoff).run,
            router.clone(),
        )

        lb_events, lb_inbox = trio.open_memory_channel[LbEvent](LB_BUFFER)
        settings = MeshSettings(
            name=config.name,
            service=config.network_service_name,
            mtu=config.mtu,
            request_timeout=config.request_timeout,
            max_backoff=config.grpc_max_backoff,
            default_lifetime=config.max_token_lifetime,
            signer=signer,
        )
        settle_by = trio.current_time() + config.request_timeout
        mesh = Mesh(
            settings, nsm=nsm_channel, addresses=addresses, router=router.clone(), shutdown=shutdown
        )
        await plane.start(mesh.run, lb_inbox)
        discovery = Discovery(
            nsm_channel,
            config.network_service_name,
            lb_events,
            token_lifetime=config.max_token_lifetime,
            backoff=Backoff(maximum=config.grpc_max_backoff),
            signer=signer,
        )
        await plane.start(discovery.run)

        # The targets' endpoint needs the gateways: the bridge addresses come first (IPAM).
        bridge = ipam.BridgeAddresses.from_config(config, ipam_channel)
        await plane.start(bridge.run, router.clone())
        endpoint = TargetEndpoint(
            name=config.name,
            service_name=config.service_name,
            mtu=config.mtu,
            addresses=addresses,
            gateways=bridge.addresses,
            router=router.clone(),
            default_lifetime=config.max_token_lifetime,
            allocation_timeout=config.request_timeout,
            reserved_prefix=connection_key_prefix(config.name, config.network_service_name),
            signer=signer,
        )
        socket_path = f"{endpoint_dir}/listen.on"
        endpoint_health = HealthServicer(Health(probes={}))  # "" SERVING, as NSM's endpoints
        endpoint_server = Server([*endpoint.servicers(), endpoint_health])
        await plane.start(
            partial(
                endpoint_server.serve_unix, socket_path, ssl_context=tls.server() if tls else None
            )
        )
        await plane.start(endpoint.run)
        url = f"unix://{socket_path}"
        plane.start_soon(probe_endpoint, url, health, config.grpc_probe_rpc_timeout, client_tls)
        registration = Registration(
            nsm_channel,
            name=config.name,
            service=config.service_name,
            host=config.host,
            url=url,
            call_timeout=config.request_timeout,
            backoff=Backoff(maximum=config.grpc_max_backoff),
            shutdown=shutdown,
            signer=signer,
        )
        plane.start_soon(registration.run)
        # The LB nexthops a previous instance left and nobody claims once the LBs registered
        # at start are connected again (at most one request timeout) are stale: the router
        # stops adopting them then.
        with trio.move_on_at(settle_by) as fallback:
            await mesh.settled.wait()
        await router.send(ConnectionsKnown())
        logger.info(
            "connections settled",
            load_balancers=len(mesh.connections),
            by="timeout" if fallback.cancelled_caught else "listing",
            after=f"{trio.current_time() - settle_by + config.request_timeout:.2f}s",
        )


async def follow_egress(router: Router, health: Health) -> None:
    """Egress is SERVING while at least one LB nexthop is installed in the kernel."""
    installed = router.egress.value
    while True:
        health.set(EGRESS, installed)
        installed = await router.egress.wait_change(installed)


async def probe_endpoint(
    url: str, health: Health, rpc_timeout: float, tls: Tls | None = None
) -> None:
    """NSMEndpoint: a health Check of our own endpoint socket every 5 s (upstream's probe,
    which speaks mutual TLS with the SVID as the endpoint does)."""
    while True:
        with trio.move_on_after(PROBE_BUDGET):
            answer = await probe.ask(url, "", PROBE_CONNECT_TIMEOUT, rpc_timeout, tls)
            health.set(NSM_ENDPOINT, answer.code == probe.EXIT_SERVING)
        await trio.sleep(PROBE_INTERVAL)


def main(config: Config, load_config: Callable[[], Config]) -> int:
    """Run the proxy with a validated configuration; `load_config` re-reads it on SIGHUP."""
    log.setup(config.log_level, config.log_format)
    logger.info("configuration read", **describe(config))
    return trio.run(Supervisor(config, load_config).run)
