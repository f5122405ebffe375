"""NetworkPolicies allow exactly the calls the design makes, and nothing else.

A small evaluator of the rendered policies (same-namespace podSelectors, ipBlocks, ports) decides,
for every pair of components, whether a connection to the callee's gRPC port is allowed: the caller's
egress and the callee's ingress must both allow it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

EXPECTED_CALLS = {
    ("envoy", "router"),
    ("router", "shard"),
    ("router", "cache"),
    ("router", "ontology"),
    ("router", "rl-state"),
}
# The in-cluster stores, and who may call them (the catalogue log: routers write, shards tail it).
IN_CLUSTER_CALLS = {("router", "postgres"), ("shard", "postgres"), ("rl-state", "postgres"), ("cache", "redis")}
# External stores: (component) -> ports it may reach by ipBlock, in the layouts whose stores are external.
EXTERNAL_STORES = {"cache": {6379}, "ontology": {7687}, "rl-state": {5432}, "shard": {5432}, "router": {5432}}
GRPC_PORTS = {"router": 50050, "shard": 50051, "cache": 50052, "ontology": 50053, "rl-state": 50054, "envoy": 8080,
              "postgres": 5432, "redis": 6379}
DNS_PORT = 53


def expected_calls(layout: str) -> set[tuple[str, str]]:
    return EXPECTED_CALLS | (IN_CLUSTER_CALLS if layout == "in-cluster" else set())


def expected_stores(layout: str) -> dict[str, set[int]]:
    return {} if layout in ("dev", "in-cluster") else EXTERNAL_STORES


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"evaluator does not handle {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def port_allowed(rule: dict[str, Any], port: int) -> bool:
    return "ports" not in rule or any(p["port"] == port for p in rule["ports"])


def peer_allowed(rule: dict[str, Any], key: str, labels: dict[str, str]) -> bool:
    """Whether a rule's peers include an in-namespace pod with ``labels``."""
    if key not in rule:
        return True  # no peers listed: everyone
    return any("podSelector" in p and "namespaceSelector" not in p and "ipBlock" not in p
               and selects(p["podSelector"], labels) for p in rule[key])


def policies_for(objects, labels):
    return [p for p in objects.of_kind("NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]


def allowed(objects, src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    egress = [r for p in policies_for(objects, src) if "Egress" in p["spec"]["policyTypes"]
              for r in p["spec"].get("egress", [])]
    ingress = [r for p in policies_for(objects, dst) if "Ingress" in p["spec"]["policyTypes"]
               for r in p["spec"].get("ingress", [])]
    return (any(port_allowed(r, port) and peer_allowed(r, "to", dst) for r in egress)
            and any(port_allowed(r, port) and peer_allowed(r, "from", src) for r in ingress))


def component_pods(objects) -> dict[str, dict[str, str]]:
    return {objects.component(w): w["spec"]["template"]["metadata"]["labels"] for w in objects.workloads()}


def test_component_calls_are_exactly_the_designs(rendered):
    pods = component_pods(rendered)
    stores = {"postgres", "redis"} if rendered.layout == "in-cluster" else set()
    assert set(pods) == set(GRPC_PORTS) - {"postgres", "redis"} | stores
    calls = {(a, b) for a in pods for b in pods if a != b and allowed(rendered, pods[a], pods[b], GRPC_PORTS[b])}
    assert calls == expected_calls(rendered.layout)


def test_the_helm_test_pod_reaches_envoy_and_nothing_else(rendered):
    (pod,) = rendered.of_kind("Pod")
    labels = pod["metadata"]["labels"]
    pods = component_pods(rendered)
    reachable = {b for b in pods if allowed(rendered, labels, pods[b], GRPC_PORTS[b])}
    assert reachable == {"envoy"}


def test_every_pod_is_default_deny(rendered):
    deny = rendered.find("NetworkPolicy", "gmco-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    for name, labels in component_pods(rendered).items():
        policies = policies_for(rendered, labels)
        assert deny in policies, name
        assert any({"Ingress", "Egress"} <= set(p["spec"]["policyTypes"]) for p in policies if p is not deny), name


def test_only_envoy_is_reachable_from_anywhere(rendered):
    for policy in rendered.of_kind("NetworkPolicy"):
        open_rules = [r for r in policy["spec"].get("ingress", []) if "from" not in r]
        if policy["metadata"]["name"] == "gmco-envoy":
            assert [r["ports"] for r in open_rules] == [[{"port": GRPC_PORTS["envoy"], "protocol": "TCP"}]]
        else:
            assert not open_rules, policy["metadata"]["name"]


def test_egress_leaves_the_cluster_only_to_the_external_stores(rendered):
    for name, labels in component_pods(rendered).items():
        external_ports: set[int] = set()
        for policy in policies_for(rendered, labels):
            for rule in policy["spec"].get("egress", []):
                assert "to" in rule, f"{name} may reach anything"
                blocks = [p["ipBlock"] for p in rule["to"] if "ipBlock" in p]
                if blocks:
                    assert all(ipaddress.ip_network(b["cidr"]) for b in blocks)
                    external_ports |= {p["port"] for p in rule["ports"]}
                else:
                    assert all("podSelector" in p for p in rule["to"]), name
        assert external_ports == expected_stores(rendered.layout).get(name, set()), name
        assert not external_ports & {DNS_PORT}


def test_production_store_egress_is_limited_to_their_cidrs(production_objects):
    policy = production_objects.find("NetworkPolicy", "gmco-cache")
    blocks = [p["ipBlock"]["cidr"] for r in policy["spec"]["egress"] for p in r["to"] if "ipBlock" in p]
    assert blocks == ["10.41.0.0/24"]
