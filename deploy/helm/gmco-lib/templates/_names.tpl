{{/*
Names, labels, ports and addresses. Every subchart derives its peers' names from these, so the router
finds "<release>-cache" whether it is rendered alone or inside the umbrella chart.
*/}}

{{/* "<release>-<component>"; args: (list $ctx "component") */}}
{{- define "gmco.lib.name" -}}
{{- $ctx := index . 0 -}}
{{- printf "%s-%s" $ctx.Release.Name (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* This chart's own name ("<release>-<chart>"). */}}
{{- define "gmco.lib.fullname" -}}
{{- include "gmco.lib.name" (list . .Chart.Name) -}}
{{- end -}}

{{/* Fully qualified DNS name of a component's Service; args: (list $ctx "component") */}}
{{- define "gmco.lib.fqdn" -}}
{{- $ctx := index . 0 -}}
{{- printf "%s.%s.svc.%s" (include "gmco.lib.name" .) $ctx.Release.Namespace ($ctx.Values.global.clusterDomain | default "cluster.local") -}}
{{- end -}}

{{/* The gRPC port of each component: fixed, so that peers agree without sharing values. */}}
{{- define "gmco.lib.grpcPort" -}}
{{- index (dict "router" 50050 "shard" 50051 "cache" 50052 "ontology" 50053 "rl-state" 50054 "envoy" 8080) . -}}
{{- end -}}

{{/* The Prometheus port of each component: 9090, or Envoy's admin port (/stats/prometheus). */}}
{{- define "gmco.lib.metricsPort" -}}
{{- ternary 9901 9090 (eq . "envoy") -}}
{{- end -}}

{{/* The environment-variable prefix of a component's settings. */}}
{{- define "gmco.lib.envPrefix" -}}
{{- printf "GMCO_%s_" (. | upper | replace "-" "_") -}}
{{- end -}}

{{- define "gmco.lib.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gmco.lib.labels" -}}
{{ include "gmco.lib.selectorLabels" . }}
app.kubernetes.io/component: {{ .Chart.Name }}
app.kubernetes.io/part-of: gmco
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector of a peer component's pods; args: (list $ctx "component") */}}
{{- define "gmco.lib.peerSelector" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
{{- end -}}

{{- define "gmco.lib.image" -}}
{{- $registry := .Values.image.registry | default .Values.global.imageRegistry -}}
{{- $ref := ternary (printf "@%s" .Values.image.digest) (printf ":%s" .Values.image.tag) (ne (.Values.image.digest | default "") "") -}}
{{- if $registry -}}{{ printf "%s/%s%s" $registry .Values.image.repository $ref }}{{- else -}}{{ printf "%s%s" .Values.image.repository $ref }}{{- end -}}
{{- end -}}

{{- define "gmco.lib.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ .Values.serviceAccount.name | default (include "gmco.lib.fullname" .) }}{{- else -}}{{ .Values.serviceAccount.name | default "default" }}{{- end -}}
{{- end -}}

{{/*
The JSON of the slot map named $name in global.slotMaps: a string as gmco_common.slots.SlotMap.to_json
writes it, or the same document as YAML ({num_slots: 4096, owner: [...]}). Fails on a missing name, a map
that is not 4096 slots, or a slot owned by a shard that does not exist. args: (list $ctx "name")
*/}}
{{- define "gmco.lib.slotMapJson" -}}
{{- $ctx := index . 0 -}}
{{- $name := index . 1 -}}
{{- $maps := $ctx.Values.global.slotMaps | default dict -}}
{{- if not (hasKey $maps $name) -}}
{{- fail (printf "slot map %q is not in global.slotMaps (it has: %s)" $name (keys $maps | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $doc := index $maps $name -}}
{{- if kindIs "string" $doc }}{{ $doc = $doc | fromJson }}{{ end -}}
{{- $owner := $doc.owner | default list -}}
{{- if or (ne (int ($doc.num_slots | default 0)) 4096) (ne (len $owner) 4096) -}}
{{- fail (printf "global.slotMaps.%s: want {\"num_slots\": 4096, \"owner\": [4096 shard ids]} (gmco_common.slots.SlotMap.to_json)" $name) -}}
{{- end -}}
{{- $n := $ctx.Values.global.shards.count | int -}}
{{- range $owner }}{{ if or (lt (int .) 0) (ge (int .) $n) }}{{ fail (printf "global.slotMaps.%s gives a slot to shard %v; global.shards.count is %d" $name . $n) }}{{ end }}{{ end -}}
{{- toJson $doc -}}
{{- end -}}
