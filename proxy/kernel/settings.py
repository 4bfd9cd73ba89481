"""The kernel side of the configuration: the `Scope` the proxy manages and its bridge MAC,
and what the proxy checks of its namespace at start."""

from __future__ import annotations

from loguru import logger
from pyroute2 import IPRoute

from proxy.config import Config, EgressMode, IpFamily
from proxy.kernel import model, nexthop, sysctl
from proxy.kernel.errors import KernelError
from proxy.kernel.netlink import NetlinkWorker


def scope_from_config(config: Config, *, resilient_supported: bool = True) -> model.Scope:
    """`auto` is a resilient group where the kernel has them, legacy multipath otherwise."""
    resilient = config.egress_mode is EgressMode.RESILIENT or (
        config.egress_mode is EgressMode.AUTO and resilient_supported
    )
    return model.Scope(
        bridge="bridge0",
        table=config.routing_table,
        rule_priority=config.rule_priority,
        mode=model.EgressMode.RESILIENT if resilient else model.EgressMode.MULTIPATH,
        resilience=model.Resilience(
            config.ecmp_buckets, config.ecmp_idle_timer, config.ecmp_unbalanced_timer
        ),
    )


def bridge_mac(config: Config) -> str:
    """Stable across restarts of the proxy on this node, for this trench and conduit."""
    return model.stable_mac(config.host, config.trench, config.conduit)


async def prepare(worker: NetlinkWorker, config: Config) -> model.Scope:
    """At start: probe the kernel's nexthop support, check and fix the sysctls (logged once),
    and return the scope to manage. Raises KernelError only when the mode was forced to
    `resilient` and the kernel cannot do it."""
    await worker.call(_loopback_up)
    support = await worker.call(nexthop.probe_support)
    scope = scope_from_config(config, resilient_supported=support.resilient_groups)
    if config.egress_mode is EgressMode.RESILIENT and not support.resilient_groups:
        raise KernelError(
            95,  # EOPNOTSUPP
            "NSM_EGRESS_MODE=resilient, but this kernel has no resilient nexthop groups",
            support.resilient_reason or support.nexthop_reason or None,
        )
    logger.info(
        "kernel egress",
        mode=scope.mode.name.lower(),
        resilient_groups=support.resilient_groups,
        reason=support.resilient_reason or "-",
    )
    families = [f for f in (model.Family.V4, model.Family.V6) if _uses(config.ip_family, f)]
    await sysctl.ensure_and_log(worker, families)
    return scope


def _uses(configured: IpFamily, family: model.Family) -> bool:
    if configured is IpFamily.DUALSTACK:
        return True
    return (configured is IpFamily.IPV4) == (family is model.Family.V4)


def _loopback_up(ipr: IPRoute) -> None:
    """A pod's `lo` is up; a bare namespace's is not, and the kernel then refuses blackhole
    nexthops (the support probe's) with ENETDOWN. Bring it up: nothing else depends on it down."""
    index = ipr.link_lookup(ifname="lo")
    if index:
        ipr.link("set", index=index[0], state="up")
