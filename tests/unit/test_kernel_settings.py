"""The configuration's kernel settings become the managed scope."""

from __future__ import annotations

from proxy import config
from proxy.kernel import model
from proxy.kernel.settings import bridge_mac, scope_from_config


def test_scope_follows_the_configuration() -> None:
    cfg = config.load(
        {
            "NSM_HOST": "node-a",
            "NSM_ROUTING_TABLE": "77",
            "NSM_RULE_PRIORITY": "100",
            "NSM_ECMP_BUCKETS": "64",
            "NSM_ECMP_IDLE_TIMER": "2s",
            "NSM_ECMP_UNBALANCED_TIMER": "0",
        }
    )
    scope = scope_from_config(cfg)
    assert (scope.bridge, scope.table, scope.rule_priority) == ("bridge0", 77, 100)
    assert scope.mode is model.EgressMode.RESILIENT
    assert scope.resilience == model.Resilience(64, 2.0, 0.0)


def test_auto_mode_falls_back_to_multipath_on_old_kernels() -> None:
    cfg = config.load({"NSM_HOST": "node-a"})
    assert scope_from_config(cfg, resilient_supported=False).mode is model.EgressMode.MULTIPATH
    forced = config.load({"NSM_HOST": "node-a", "NSM_EGRESS_MODE": "multipath"})
    assert scope_from_config(forced).mode is model.EgressMode.MULTIPATH


def test_bridge_mac_depends_on_node_trench_and_conduit() -> None:
    a = config.load({"NSM_HOST": "node-a", "NSM_TRENCH": "t", "NSM_CONDUIT": "c"})
    b = config.load({"NSM_HOST": "node-b", "NSM_TRENCH": "t", "NSM_CONDUIT": "c"})
    assert bridge_mac(a) == bridge_mac(a) != bridge_mac(b)
