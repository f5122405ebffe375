"""Writes values.schema.json for the umbrella chart and every subchart from one description.

Every subchart shares the service shape (image, replicas, resources, nodeSelector, tolerations, affinity,
extraEnv, hpa, pdb, security contexts, ...), so the schemas are generated rather than copied six times:

    .venv/bin/python deploy/helm/values_schema.py          # rewrite the schema files
    .venv/bin/python deploy/helm/values_schema.py --check  # exit 1 if a file is stale (tests/deploy runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parent / "gmco"
Schema = dict[str, Any]

STRING = {"type": "string"}
BOOL = {"type": "boolean"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT = {"type": "object"}
OBJECTS = {"type": "array", "items": OBJECT}
INT_OR_PERCENT = {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^[0-9]+%$"}]}
CIDRS = {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"}}


def obj(properties: Schema, required: list[str] | None = None, closed: bool = True) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required is not None:
        schema["required"] = required
    if closed:
        schema["additionalProperties"] = False
    return schema


def integer(minimum: int | None = None, maximum: int | None = None) -> Schema:
    schema: Schema = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def port() -> Schema:
    return integer(1, 65535)


def secret_ref() -> Schema:
    """A Secret's name, or "" (the chart creates "<release>-<store>" from the password value)."""
    return {"type": "string", "pattern": "^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$"}


# A slot map's name, as router.slotMap / shard.slotMap refer to it ("" = the even map).
MAP_NAME = {"type": "string", "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", "maxLength": 63}
SLOT_MAPS = {
    "type": "object",
    "propertyNames": {"pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "additionalProperties": {"oneOf": [
        {"type": "string", "minLength": 2},  # SlotMap.to_json; the chart parses and checks it
        obj({"num_slots": {"const": 4096},
             "owner": {"type": "array", "minItems": 4096, "maxItems": 4096, "items": integer(0, 4095)}},
            ["num_slots", "owner"]),
    ]},
}
STORE_MODE = {"enum": ["external", "in-cluster"]}


# The restricted Pod Security Standard, enforced: an override can tune it but not weaken it.
POD_SECURITY = obj(
    {
        "runAsNonRoot": {"const": True},
        "runAsUser": integer(1),
        "runAsGroup": integer(1),
        "fsGroup": integer(1),
        "seccompProfile": obj({"type": {"enum": ["RuntimeDefault", "Localhost"]}, "localhostProfile": STRING},
                              ["type"]),
    },
    ["runAsNonRoot", "seccompProfile"],
)
CONTAINER_SECURITY = obj(
    {
        "runAsNonRoot": {"const": True},
        "runAsUser": integer(1),
        "runAsGroup": integer(1),
        "allowPrivilegeEscalation": {"const": False},
        "readOnlyRootFilesystem": {"const": True},
        "privileged": {"const": False},
        "capabilities": obj({"drop": {"type": "array", "contains": {"const": "ALL"}},
                             "add": {"type": "array", "maxItems": 0}}, ["drop"]),
        "seccompProfile": obj({"type": {"enum": ["RuntimeDefault", "Localhost"]}, "localhostProfile": STRING},
                              ["type"]),
    },
    ["allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities", "seccompProfile"],
)

GLOBAL_COMMON: Schema = {
    "imageRegistry": STRING,
    "clusterDomain": {"type": "string", "minLength": 1},
    "networkPolicy": obj({"enabled": BOOL, "metricsFrom": OBJECTS, "dnsTo": OBJECTS},
                         ["enabled", "metricsFrom", "dnsTo"]),
}
GLOBAL_PARTS: dict[str, Schema] = {
    "auth": obj({"existingSecret": secret_ref(), "token": STRING, "tokenKey": {"type": "string", "minLength": 1}},
                ["existingSecret", "token", "tokenKey"]),
    "tracing": obj({"exporter": {"enum": ["none", "otlp"]}, "endpoint": STRING, "networkPolicyTo": OBJECTS},
                   ["exporter", "endpoint", "networkPolicyTo"]),
    "shards": obj({"count": integer(1, 4096)}, ["count"]),
    "slotMaps": SLOT_MAPS,
    "catalog": obj({"enabled": BOOL}, ["enabled"]),
    "postgres": obj(
        {
            "mode": STORE_MODE,
            "host": {"type": "string", "minLength": 1},
            "port": port(),
            "database": {"type": "string", "minLength": 1},
            "user": {"type": "string", "minLength": 1},
            "sslmode": {"enum": ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]},
            "existingSecret": secret_ref(),
            "password": STRING,
            "passwordKey": {"type": "string", "minLength": 1},
            "cidrs": CIDRS,
        },
        ["mode", "host", "port", "database", "user", "sslmode", "existingSecret", "password", "passwordKey", "cidrs"],
    ),
    "redis": obj(
        {
            "mode": STORE_MODE,
            "nodes": {"type": "array", "minItems": 1,
                      "items": {"type": "string", "pattern": "^[^:]+:[0-9]{1,5}$"}},
            "existingSecret": secret_ref(),
            "password": STRING,
            "passwordKey": {"type": "string", "minLength": 1},
            "cidrs": CIDRS,
        },
        ["mode", "nodes", "existingSecret", "password", "passwordKey", "cidrs"],
    ),
    "neo4j": obj(
        {
            "uri": {"type": "string", "pattern": r"^(neo4j|bolt)(\+s|\+ssc)?://[^/]+$"},
            "database": {"type": "string", "minLength": 1},
            "user": {"type": "string", "minLength": 1},
            "existingSecret": secret_ref(),
            "password": STRING,
            "passwordKey": {"type": "string", "minLength": 1},
            "cidrs": CIDRS,
        },
        ["uri", "database", "user", "existingSecret", "password", "passwordKey", "cidrs"],
    ),
}


def global_schema(parts: list[str]) -> Schema:
    props = dict(GLOBAL_COMMON) | {p: GLOBAL_PARTS[p] for p in parts}
    # Subcharts see the whole of the umbrella's global block, so they must not reject its other keys.
    return obj(props, list(props), closed=False)


def service_schema(parts: list[str], extra: Schema, log_levels: list[str]) -> Schema:
    """The values every subchart shares, plus its own (``extra``)."""
    props: Schema = {
        "enabled": BOOL,
        "global": global_schema(parts),
        "gmco-lib": OBJECT,  # Helm adds a (empty) values key for the library dependency
        "image": obj(
            {
                "registry": STRING,
                "repository": {"type": "string", "minLength": 1},
                "tag": {"type": "string", "minLength": 1},
                "digest": {"type": "string", "pattern": "^(sha256:[a-f0-9]{64})?$"},
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            },
            ["repository", "tag", "pullPolicy"],
        ),
        "imagePullSecrets": OBJECTS,
        "replicas": integer(1),
        "resources": obj({"requests": OBJECT, "limits": OBJECT, "claims": OBJECTS}),
        "nodeSelector": STR_MAP,
        "tolerations": OBJECTS,
        "affinity": OBJECT,
        "topologySpreadConstraints": OBJECTS,
        "extraEnv": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "logLevel": {"enum": log_levels},
        "gracePeriodSeconds": integer(0, 600),
        "podAnnotations": STR_MAP,
        "podLabels": STR_MAP,
        "hpa": obj(
            {
                "enabled": BOOL,
                "minReplicas": integer(1),
                "maxReplicas": integer(1),
                "targetCPUUtilizationPercentage": integer(1, 100),
                "scaleDownStabilizationSeconds": integer(0, 3600),
            },
            ["enabled", "minReplicas", "maxReplicas", "targetCPUUtilizationPercentage",
             "scaleDownStabilizationSeconds"],
        ),
        "pdb": obj({"enabled": BOOL, "maxUnavailable": INT_OR_PERCENT, "minAvailable": INT_OR_PERCENT},
                   ["enabled"]),
        "podSecurityContext": POD_SECURITY,
        "containerSecurityContext": CONTAINER_SECURITY,
        "probes": obj(
            {
                "periodSeconds": integer(1),
                "timeoutSeconds": integer(1),
                "startupFailureThreshold": integer(1),
                "livenessFailureThreshold": integer(1),
            },
            ["periodSeconds", "timeoutSeconds", "startupFailureThreshold", "livenessFailureThreshold"],
        ),
        "serviceAccount": obj({"create": BOOL, "name": STRING}, ["create", "name"]),
        "metrics": obj(
            {
                "serviceMonitor": obj(
                    {
                        "enabled": BOOL,
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m)$"},
                        "labels": STR_MAP,
                    },
                    ["enabled", "interval", "scrapeTimeout"],
                )
            },
            ["serviceMonitor"],
        ),
    } | extra
    required = [k for k in props if k not in ("enabled", "gmco-lib", "config")]
    return {"$schema": "https://json-schema.org/draft-07/schema#", **obj(props, required)}


PY_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
SETTINGS = {"type": "object", "propertyNames": {"pattern": "^[A-Z][A-Z0-9_]*$"},
            "additionalProperties": {"type": ["string", "number", "boolean"]}}

SHARD_EXTRA: Schema = {
    "config": SETTINGS,
    "replicasPerShard": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                         "additionalProperties": integer(1)},
    "gpu": obj({"resourceName": {"type": "string", "minLength": 1}, "count": integer(0)},
               ["resourceName", "count"]),
    "slotMap": MAP_NAME,
    "slotMapPerShard": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                        "additionalProperties": MAP_NAME},
    "demoCatalogue": obj({"items": integer(0, 10_000_000), "seed": integer(0), "resources": obj(
        {"requests": OBJECT, "limits": OBJECT})}, ["items", "seed", "resources"]),
    "zoneAntiAffinity": obj({"mode": {"enum": ["required", "preferred"]},
                             "topologyKey": {"type": "string", "minLength": 1}}, ["mode", "topologyKey"]),
    "dim": integer(1, 65536),
    "indexBackend": {"enum": ["exact", "ivf", "hnsw", "cuvs", "milvus"]},
    "persistence": obj({"enabled": BOOL, "storageClass": STRING,
                        "size": {"type": "string", "pattern": "^[0-9]+(Mi|Gi|Ti)$"},
                        "mountPath": {"type": "string", "pattern": "^/"}},
                       ["enabled", "storageClass", "size", "mountPath"]),
}
ENVOY_EXTRA: Schema = {
    "concurrency": integer(0, 256),
    "service": obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "annotations": STR_MAP},
                   ["type", "annotations"]),
    "proxy": obj(
        {
            "ringMinSize": integer(1, 8388608),
            "ringMaxSize": integer(1, 8388608),
            "retries": integer(0, 10),
            "routeTimeoutSeconds": {"type": "number", "exclusiveMinimum": 0},
            "healthIntervalSeconds": {"type": "number", "exclusiveMinimum": 0},
            "healthTimeoutSeconds": {"type": "number", "exclusiveMinimum": 0},
            "healthNoTrafficIntervalSeconds": {"type": "number", "exclusiveMinimum": 0},
            "healthUnhealthyThreshold": integer(1),
            "healthHealthyThreshold": integer(1),
            "outlierConsecutive5xx": integer(1),
            "outlierIntervalSeconds": {"type": "number", "exclusiveMinimum": 0},
            "outlierBaseEjectionSeconds": {"type": "number", "exclusiveMinimum": 0},
            "maxRequests": integer(1),
            "maxRetries": integer(0),
        },
        ["ringMinSize", "ringMaxSize", "retries", "routeTimeoutSeconds", "healthIntervalSeconds",
         "healthTimeoutSeconds", "healthNoTrafficIntervalSeconds", "healthUnhealthyThreshold",
         "healthHealthyThreshold", "outlierConsecutive5xx", "outlierIntervalSeconds",
         "outlierBaseEjectionSeconds", "maxRequests", "maxRetries"],
    ),
}
ENVOY_LOG_LEVELS = ["trace", "debug", "info", "warning", "warn", "error", "critical", "off"]

SUBCHARTS: dict[str, Schema] = {
    "router": service_schema(["auth", "tracing", "shards", "slotMaps", "catalog", "postgres"],
                             {"config": SETTINGS, "slotMap": MAP_NAME}, PY_LOG_LEVELS),
    "shard": service_schema(["auth", "tracing", "shards", "slotMaps", "catalog", "postgres"], SHARD_EXTRA, PY_LOG_LEVELS),
    "cache": service_schema(["auth", "tracing", "redis"], {"config": SETTINGS, "backend": {"enum": ["memory", "redis"]}},
                            PY_LOG_LEVELS),
    "ontology": service_schema(["auth", "tracing", "neo4j"], {"config": SETTINGS, "backend": {"enum": ["embedded", "neo4j"]}},
                               PY_LOG_LEVELS),
    "rl-state": service_schema(["auth", "tracing", "postgres"], {"config": SETTINGS, "backend": {"enum": ["sqlite", "postgres"]}},
                               PY_LOG_LEVELS),
    "envoy": service_schema([], ENVOY_EXTRA, ENVOY_LOG_LEVELS),
}


def umbrella_schema() -> Schema:
    # A component's own keys are checked by its subchart's schema; here only the switch.
    components = {name: obj({"enabled": BOOL}, ["enabled"], closed=False) for name in SUBCHARTS}
    monitoring = obj(
        {
            "prometheusRule": obj({"enabled": BOOL, "labels": STR_MAP}, ["enabled", "labels"]),
            "grafanaDashboard": obj({"enabled": BOOL, "namespace": STRING, "labels": STR_MAP},
                                    ["enabled", "namespace", "labels"]),
        },
        ["prometheusRule", "grafanaDashboard"],
    )
    image = obj({"registry": STRING, "repository": {"type": "string", "minLength": 1},
                 "tag": {"type": "string", "minLength": 1}, "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}},
                ["registry", "repository", "tag", "pullPolicy"])
    resources = obj({"requests": OBJECT, "limits": OBJECT})
    stores = obj(
        {
            "postgres": obj({"image": image, "resources": resources,
                             "persistence": obj({"enabled": BOOL, "storageClass": STRING,
                                                 "size": {"type": "string", "pattern": "^[0-9]+(Mi|Gi|Ti)$"}},
                                                ["enabled", "storageClass", "size"])},
                            ["image", "resources", "persistence"]),
            "redis": obj({"image": image, "resources": resources,
                          "maxMemory": {"type": "string", "pattern": "^[0-9]+(kb|mb|gb)$"}},
                         ["image", "resources", "maxMemory"]),
        },
        ["postgres", "redis"],
    )
    tests = obj({"enabled": BOOL, "userId": {"type": "string", "minLength": 1}, "minItems": integer(0, 100)},
                ["enabled", "userId", "minItems"])
    props = {"global": global_schema(list(GLOBAL_PARTS)), **components, "stores": stores, "tests": tests,
             "monitoring": monitoring}
    return {"$schema": "https://json-schema.org/draft-07/schema#", **obj(props, list(props))}


def expected_files() -> dict[Path, str]:
    files = {CHART / "values.schema.json": umbrella_schema()}
    files |= {CHART / "charts" / name / "values.schema.json": schema for name, schema in SUBCHARTS.items()}
    return {path: json.dumps(schema, indent=2) + "\n" for path, schema in files.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if a schema file differs from the generated one")
    args = parser.parse_args()
    stale = []
    for path, text in expected_files().items():
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(CHART.parent.parent.parent)}")
    if stale:
        print("stale schema files (run: .venv/bin/python deploy/helm/values_schema.py):", *stale, sep="\n  ",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
