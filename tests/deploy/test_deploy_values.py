"""Values: one documented shape, a schema that rejects bad values, and generated schemas up to date."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

PARAM = re.compile(r"^\s*## @param (\S+)")


@pytest.mark.parametrize(
    "sets, message",
    [
        (["global.shards.count=0"], "global.shards.count"),
        (["router.image.tag=null"], "tag"),
        (["shard.image.tag="], "image.tag"),
        (["shard.replicas=0"], "replicas"),
        (["shard.indexBackend=faiss"], "indexBackend"),
        (["router.replica=3"], "replica"),
        (["cache.containerSecurityContext.readOnlyRootFilesystem=false"], "readOnlyRootFilesystem"),
        (["rl-state.podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
        (["global.redis.nodes={redis-without-port}"], "global.redis.nodes"),
        (["envoy.proxy.ringMinSize=0"], "ringMinSize"),
        (["router.hpa.targetCPUUtilizationPercentage=150"], "targetCPUUtilizationPercentage"),
        (["cache.backend=memcached"], "backend"),
        (["rl-state.backend=mysql"], "backend"),
        (["global.postgres.mode=managed"], "global.postgres.mode"),
        (["shard.gpu.count=-1"], "gpu.count"),
        (["router.slotMap=Not_A_Name"], "slotMap"),
        (["global.postgres.existingSecret=Bad_Name"], "existingSecret"),
    ],
)
def test_schema_rejects_bad_values(chart, sets, message):
    assert message in chart.rejection(sets=sets)


def test_subchart_schema_rejects_bad_values_alone(chart):
    assert "global.shards.count" in chart.rejection(chart.subchart("shard"), sets=["global.shards.count=0"])
    assert "image.tag" in chart.rejection(chart.subchart("envoy"), sets=["image.tag="])


def test_schemas_are_generated_from_values_schema_py(chart):
    script = chart.root / "deploy" / "helm" / "values_schema.py"
    result = subprocess.run([sys.executable, str(script), "--check"], check=False, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def leaves(values, prefix=""):
    """Dotted paths of a values tree; lists and empty maps are leaves."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, path + ".")
        else:
            yield path


def exists(values, path: str) -> bool:
    node = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def values_files(chart):
    return [chart.path / "values.yaml"] + [chart.subchart(n) / "values.yaml" for n in chart.subcharts]


def test_every_value_is_documented(chart):
    for path in values_files(chart):
        text = path.read_text()
        values = yaml.safe_load(text)
        params = [m.group(1) for line in text.splitlines() if (m := PARAM.match(line))]
        assert len(params) == len(set(params)), f"{path}: a @param is repeated"
        for param in params:
            assert exists(values, param), f"{path}: @param {param} names no value"
        for leaf in leaves(values):
            parts = leaf.split(".")
            documented = any(".".join(parts[:i]) in params for i in range(1, len(parts) + 1))
            assert documented, f"{path}: {leaf} has no ## @param"


def test_subcharts_share_one_values_shape(chart):
    shape = {"image", "replicas", "resources", "nodeSelector", "tolerations", "affinity", "extraEnv", "hpa",
             "pdb", "podSecurityContext", "containerSecurityContext", "probes", "serviceAccount", "metrics"}
    for name in chart.subcharts:
        values = yaml.safe_load((chart.subchart(name) / "values.yaml").read_text())
        assert shape <= set(values), f"{name} lacks {shape - set(values)}"


def test_subchart_global_defaults_match_the_umbrella(chart):
    umbrella = yaml.safe_load((chart.path / "values.yaml").read_text())["global"]
    for name in chart.subcharts:
        own = yaml.safe_load((chart.subchart(name) / "values.yaml").read_text())["global"]
        for key, value in own.items():
            assert umbrella[key] == value, f"{name}: global.{key} differs from the umbrella's default"
