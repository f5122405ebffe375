"""Each service's default port is one number, everywhere it is written down: the settings, the README's
list, the router's default targets, the chart's port table and the image build arguments."""

from __future__ import annotations

import dataclasses
import re

import pytest
from gmco_cache.config import Settings as CacheSettings
from gmco_common.config import ConfigError, load_settings
from gmco_ontology.config import Settings as OntologySettings
from gmco_rl_state.config import Settings as RlStateSettings
from gmco_router.config import Settings as RouterSettings
from gmco_shard.config import Settings as ShardSettings
from gmco_stack.envoy import REPO_ROOT

PORTS = {"router": 50050, "shard": 50051, "cache": 50052, "ontology": 50053, "rl_state": 50054}
SETTINGS = {"router": RouterSettings, "shard": ShardSettings, "cache": CacheSettings,
            "ontology": OntologySettings, "rl_state": RlStateSettings}


def _default(cls, name: str):
    return cls.__dataclass_fields__[name].default


def test_settings_defaults_are_distinct_and_documented() -> None:
    assert {svc: _default(cls, "port") for svc, cls in SETTINGS.items()} == PORTS
    readme = (REPO_ROOT / "README.md").read_text()
    listed = dict(re.findall(r"(router|shard|cache|ontology|rl_state) (\d{5})", readme))
    assert {k: int(v) for k, v in listed.items()} == PORTS


def test_the_router_targets_its_peers_on_their_defaults() -> None:
    for peer in ("cache", "ontology", "rl_state"):
        assert _default(RouterSettings, f"{peer}_target") == f"127.0.0.1:{PORTS[peer]}"


def test_chart_and_images_use_the_same_ports() -> None:
    names = (REPO_ROOT / "deploy/helm/gmco-lib/templates/_names.tpl").read_text()
    table = re.search(r'define "gmco.lib.grpcPort".*?dict (.*?)\)', names, re.DOTALL)
    assert table, "the chart's grpcPort table"
    chart = dict(re.findall(r'"([a-z-]+)" (\d+)', table.group(1)))
    assert {svc: int(chart[svc.replace("_", "-")]) for svc in PORTS} == PORTS
    builds = (REPO_ROOT / "scripts/build-images.sh").read_text()
    for svc, port in PORTS.items():
        if svc != "shard":
            assert f"SERVICE={svc} --build-arg PORT={port}" in builds
    assert f"GMCO_IMAGE_PORT={PORTS['shard']}" in (REPO_ROOT / "deploy/images/shard.Dockerfile").read_text()


@pytest.mark.parametrize("svc", sorted(SETTINGS))
@pytest.mark.parametrize("value", ["99999", "-1", "http"])
def test_an_out_of_range_port_is_refused_naming_the_variable(svc: str, value: str) -> None:
    prefix = f"GMCO_{svc.upper()}_"
    with pytest.raises(ConfigError, match=f"{prefix}PORT="):
        load_settings(SETTINGS[svc], prefix, {f"{prefix}PORT": value})


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_the_metrics_port_keeps_its_range_check(svc: str) -> None:
    prefix = f"GMCO_{svc.upper()}_"
    with pytest.raises(ConfigError, match=f"{prefix}METRICS_PORT=70000 is invalid"):
        load_settings(SETTINGS[svc], prefix, {f"{prefix}METRICS_PORT": "70000"})


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_every_numeric_setting_has_a_range_check(svc: str) -> None:
    unchecked = [f.name for f in dataclasses.fields(SETTINGS[svc])
                 if re.search(r"\b(int|float)\b", str(f.type)) and not f.metadata.get("check")]
    assert not unchecked, f"{svc}: numeric settings without a range check: {unchecked}"


@pytest.mark.parametrize(("svc", "name"), [("rl_state", "PROJECTION_SEED"), ("shard", "FEATURE_SEED")])
def test_a_negative_seed_is_refused_at_start(svc: str, name: str) -> None:
    prefix = f"GMCO_{svc.upper()}_"
    with pytest.raises(ConfigError, match=f"{prefix}{name}=-1 is invalid"):
        load_settings(SETTINGS[svc], prefix, {f"{prefix}{name}": "-1"})
