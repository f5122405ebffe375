"""Reading a running service's Prometheus metrics in tests."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (a Prometheus sample name, e.g. ``..._count``) served at ``url``
    whose labels include ``labels``."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))
