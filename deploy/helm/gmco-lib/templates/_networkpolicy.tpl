{{/*
NetworkPolicy of one component. Selecting a pod for both Ingress and Egress denies everything not listed,
so each component's policy is exactly the calls the design makes (the umbrella adds a release-wide
default-deny as a backstop). args:
  ctx     $
  from    components allowed to call this component's gRPC port
  public  true: anyone may call the gRPC port (Envoy, the entry point)
  to      components this one calls
  stores  stores this one talks to: "postgres", "redis", "neo4j" (external ones by global.<store>.cidrs,
          in-cluster ones by podSelector)
Every pod may resolve DNS and be scraped on its metrics port from global.networkPolicy.metricsFrom; a
GMC-O service exporting spans (global.tracing.exporter=otlp) may reach global.tracing.networkPolicyTo on
the collector's port.
*/}}
{{- define "gmco.lib.networkPolicy" -}}
{{- $ctx := .ctx -}}
{{- $np := $ctx.Values.global.networkPolicy -}}
{{- if $np.enabled }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "gmco.lib.fullname" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "gmco.lib.labels" $ctx | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "gmco.lib.selectorLabels" $ctx | nindent 6 }}
  policyTypes: [Ingress, Egress]
  ingress:
    {{- if or .public .from }}
    - ports:
        - port: {{ include "gmco.lib.grpcPort" $ctx.Chart.Name }}
          protocol: TCP
      {{- if not .public }}
      from:
        {{- range .from }}
        - podSelector:
            matchLabels:
              {{- include "gmco.lib.peerSelector" (list $ctx .) | nindent 14 }}
        {{- end }}
      {{- end }}
    {{- end }}
    - ports:
        - port: {{ include "gmco.lib.metricsPort" $ctx.Chart.Name }}
          protocol: TCP
      from:
        {{- toYaml $np.metricsFrom | nindent 8 }}
  egress:
    - ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
      to:
        {{- toYaml $np.dnsTo | nindent 8 }}
    {{- range .to }}
    - ports:
        - port: {{ include "gmco.lib.grpcPort" . }}
          protocol: TCP
      to:
        - podSelector:
            matchLabels:
              {{- include "gmco.lib.peerSelector" (list $ctx .) | nindent 14 }}
    {{- end }}
    {{- range $store := .stores }}
    {{- $cfg := index $ctx.Values.global $store }}
    {{- if include "gmco.lib.storeInCluster" (list $ctx $store) }}
    - ports:
        - port: {{ include "gmco.lib.storePort" $store }}
          protocol: TCP
      to:
        - podSelector:
            matchLabels:
              {{- include "gmco.lib.peerSelector" (list $ctx $store) | nindent 14 }}
    {{- else }}
    - ports:
        {{- range include "gmco.lib.storePorts" (list $store $cfg) | splitList "," | uniq }}
        - port: {{ . }}
          protocol: TCP
        {{- end }}
      to:
        {{- range $cfg.cidrs }}
        - ipBlock:
            cidr: {{ . }}
        {{- end }}
    {{- end }}
    {{- end }}
    {{- if and (ne $ctx.Chart.Name "envoy") $ctx.Values.global.tracing }}
    {{- if and (eq (include "gmco.lib.tracingExporter" $ctx) "otlp") $ctx.Values.global.tracing.networkPolicyTo }}
    - ports:
        - port: {{ include "gmco.lib.tracingPort" $ctx }}
          protocol: TCP
      to:
        {{- toYaml $ctx.Values.global.tracing.networkPolicyTo | nindent 8 }}
    {{- end }}
    {{- end }}
{{- end }}
{{- end -}}

{{/* The port of an in-cluster store. */}}
{{- define "gmco.lib.storePort" -}}
{{- index (dict "postgres" 5432 "redis" 6379) . -}}
{{- end -}}

{{/* The TCP ports of an external store, comma-separated: from its host:port list or its URI. */}}
{{- define "gmco.lib.storePorts" -}}
{{- $store := index . 0 -}}
{{- $cfg := index . 1 -}}
{{- if eq $store "redis" -}}
{{- $ports := list -}}
{{- range $cfg.nodes }}{{ $ports = append $ports (splitList ":" . | last) }}{{ end -}}
{{- join "," $ports -}}
{{- else if eq $store "neo4j" -}}
{{- regexFind ":[0-9]+$" $cfg.uri | trimPrefix ":" | default "7687" -}}
{{- else -}}
{{- $cfg.port -}}
{{- end -}}
{{- end -}}
