"""The kernel side of the configuration: the `Scope` the proxy manages and its bridge MAC."""

from __future__ import annotations

from proxy.config import Config, EgressMode
from proxy.kernel import model


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
