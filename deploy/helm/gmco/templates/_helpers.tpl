{{/* Labels of the objects the umbrella chart renders itself; args: (list $ "component") */}}
{{- define "gmco.umbrella.labels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/part-of: gmco
app.kubernetes.io/version: {{ $.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $.Chart.Name $.Chart.Version }}
{{- end -}}

{{- define "gmco.umbrella.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/instance: {{ $.Release.Name }}
{{- end -}}

{{/*
The components that use a store ("router shard" ...), space-separated; "" = none. A component uses
PostgreSQL for the catalogue log (router, shard: global.catalog.enabled) or for user state (rl-state:
backend postgres), Redis for the cache (backend redis), Neo4j for the ontology (backend neo4j).
args: (list $ "postgres")
*/}}
{{- define "gmco.storeUsers" -}}
{{- $ := index . 0 -}}
{{- $store := index . 1 -}}
{{- $v := $.Values -}}
{{- $users := list -}}
{{- if eq $store "postgres" -}}
{{- if $v.global.catalog.enabled -}}
{{- if $v.router.enabled }}{{ $users = append $users "router" }}{{ end -}}
{{- if $v.shard.enabled }}{{ $users = append $users "shard" }}{{ end -}}
{{- end -}}
{{- if and (index $v "rl-state" "enabled") (eq (index $v "rl-state" "backend") "postgres") }}{{ $users = append $users "rl-state" }}{{ end -}}
{{- else if eq $store "redis" -}}
{{- if and $v.cache.enabled (eq $v.cache.backend "redis") }}{{ $users = append $users "cache" }}{{ end -}}
{{- else if eq $store "neo4j" -}}
{{- if and $v.ontology.enabled (eq $v.ontology.backend "neo4j") }}{{ $users = append $users "ontology" }}{{ end -}}
{{- end -}}
{{- join " " $users -}}
{{- end -}}

{{/* "true" when the umbrella runs the store itself; args: (list $ "postgres") */}}
{{- define "gmco.storeRunsHere" -}}
{{- $ := index . 0 -}}
{{- $store := index . 1 -}}
{{- if and (include "gmco.storeUsers" .) (eq ((index $.Values.global $store).mode | default "external") "in-cluster") }}true{{ end -}}
{{- end -}}

{{/* A Secret's value that stays the same across upgrades: the given one, else the one already in the
cluster, else a new random one. args: (list $ "secret-name" "key" "given") */}}
{{- define "gmco.stableSecret" -}}
{{- $ := index . 0 -}}
{{- $given := index . 3 -}}
{{- if $given -}}
{{- $given -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" $.Release.Namespace (index . 1) -}}
{{- if and $existing (hasKey ($existing.data | default dict) (index . 2)) -}}
{{- index $existing.data (index . 2) | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}
