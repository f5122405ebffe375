{{/* The router's own settings: where the shards and the other services are. */}}
{{- define "router.env" -}}
{{- $shardHost := printf "%s-{shard}.%s.svc.%s" (include "gmco.lib.name" (list . "shard")) .Release.Namespace .Values.global.clusterDomain -}}
SHARD_DNS: {{ printf "%s:%s" $shardHost (include "gmco.lib.grpcPort" "shard") | quote }}
SHARD_COUNT: {{ .Values.global.shards.count | quote }}
CACHE_TARGET: {{ printf "%s:%s" (include "gmco.lib.fqdn" (list . "cache")) (include "gmco.lib.grpcPort" "cache") | quote }}
ONTOLOGY_TARGET: {{ printf "%s:%s" (include "gmco.lib.fqdn" (list . "ontology")) (include "gmco.lib.grpcPort" "ontology") | quote }}
RL_STATE_TARGET: {{ printf "%s:%s" (include "gmco.lib.fqdn" (list . "rl-state")) (include "gmco.lib.grpcPort" "rl-state") | quote }}
{{- end -}}

