{{/*
The environment of a GMC-O process, as ConfigMap data: the settings every server shares, then the
component's own (args.env, a dict of suffix -> value), then the operator's .Values.config.
Keys are "<PREFIX><SUFFIX>", e.g. GMCO_ROUTER_CACHE_TARGET, and, with global.tracing.exporter=otlp, the
exporter's own OTEL_EXPORTER_OTLP_ENDPOINT. args: dict "ctx" $ "env" $dict
*/}}
{{- define "gmco.lib.envData" -}}
{{- $ctx := .ctx -}}
{{- $prefix := include "gmco.lib.envPrefix" $ctx.Chart.Name -}}
{{- $env := dict
    "HOST" "0.0.0.0"
    "PORT" (include "gmco.lib.grpcPort" $ctx.Chart.Name)
    "METRICS_PORT" (include "gmco.lib.metricsPort" $ctx.Chart.Name)
    "LOG_LEVEL" $ctx.Values.logLevel
    "LOG_FORMAT" "json"
    "GRACE_SECONDS" (toString $ctx.Values.gracePeriodSeconds)
    "OTEL_EXPORTER" (include "gmco.lib.tracingExporter" $ctx) -}}
{{- $env = merge (deepCopy ($ctx.Values.config | default dict)) (.env | default dict) $env -}}
{{- range $key := keys $env | sortAlpha }}
{{ printf "%s%s" $prefix $key }}: {{ index $env $key | toString | quote }}
{{- end }}
{{- if eq (include "gmco.lib.tracingExporter" $ctx) "otlp" }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ $ctx.Values.global.tracing.endpoint | quote }}
{{- end -}}
{{- end -}}

{{/* global.tracing.exporter ("none" where the values have no tracing block); otlp needs an endpoint. */}}
{{- define "gmco.lib.tracingExporter" -}}
{{- $tracing := .Values.global.tracing | default dict -}}
{{- $exporter := $tracing.exporter | default "none" -}}
{{- if and (eq $exporter "otlp") (not $tracing.endpoint) -}}
{{- fail "global.tracing.exporter=otlp needs global.tracing.endpoint (the collector's OTLP/gRPC address)" -}}
{{- end -}}
{{- $exporter -}}
{{- end -}}

{{/* The TCP port of the collector's endpoint (4317, OTLP/gRPC's, when it names none). */}}
{{- define "gmco.lib.tracingPort" -}}
{{- regexFind ":[0-9]+$" (regexReplaceAll "/+$" (regexReplaceAll "^[a-z]+://" .Values.global.tracing.endpoint "") "") | trimPrefix ":" | default "4317" -}}
{{- end -}}

{{/* The ConfigMap "<release>-<chart>-env". args: as gmco.lib.envData */}}
{{- define "gmco.lib.envConfigMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "gmco.lib.fullname" .ctx }}-env
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "gmco.lib.labels" .ctx | nindent 4 }}
data:
  {{- include "gmco.lib.envData" . | trim | nindent 2 }}
{{- end -}}

{{/*
Secret-backed variables. Every server gets <PREFIX>AUTH_TOKEN when global.auth.existingSecret or
global.auth.token is set (the router also sends it downstream); args.secretEnv adds a component's own, as a list of
{name, secret, key}.
*/}}
{{- define "gmco.lib.secretEnv" -}}
{{- $ctx := .ctx -}}
{{- $prefix := include "gmco.lib.envPrefix" $ctx.Chart.Name -}}
{{- $list := .secretEnv | default list -}}
{{- with include "gmco.lib.authSecretName" $ctx }}
{{- $list = prepend $list (dict "name" (printf "%sAUTH_TOKEN" $prefix) "secret" . "key" ($ctx.Values.global.auth.tokenKey | default "token")) -}}
{{- end -}}
{{- range $list }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end -}}
{{- end -}}

{{/*
A pod template (metadata + spec) for one GMC-O server: restricted security context, no service-account
token, gRPC health probes on the serving port, a metrics port, a checksum of its configuration and a
writable /tmp on a read-only root filesystem.
args: dict "ctx" $ "checksum" sha "podEnv" [extra EnvVar] "secretEnv" [..] "labels" {} "annotations" {}
           "volumes" [] "volumeMounts" [] "initContainers" [] "resources" {} "nodeSelector" {} "tolerations" []
           "affinity" {}
*/}}
{{- define "gmco.lib.podTemplate" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $port := include "gmco.lib.grpcPort" $ctx.Chart.Name | int -}}
metadata:
  labels:
    {{- include "gmco.lib.labels" $ctx | nindent 4 }}
    {{- with .labels }}{{ toYaml . | nindent 4 }}{{ end }}
    {{- with $v.podLabels }}{{ toYaml . | nindent 4 }}{{ end }}
  annotations:
    checksum/config: {{ .checksum }}
    {{- with .annotations }}{{ toYaml . | nindent 4 }}{{ end }}
    {{- with $v.podAnnotations }}{{ toYaml . | nindent 4 }}{{ end }}
spec:
  serviceAccountName: {{ include "gmco.lib.serviceAccountName" $ctx }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ add $v.gracePeriodSeconds 10 }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .initContainers }}
  initContainers:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ $ctx.Chart.Name }}
      image: {{ include "gmco.lib.image" $ctx }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      ports:
        - name: grpc
          containerPort: {{ $port }}
          protocol: TCP
        - name: metrics
          containerPort: {{ include "gmco.lib.metricsPort" $ctx.Chart.Name }}
          protocol: TCP
      envFrom:
        - configMapRef:
            name: {{ include "gmco.lib.fullname" $ctx }}-env
      env:
        - name: {{ include "gmco.lib.envPrefix" $ctx.Chart.Name }}INSTANCE_ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- with .podEnv }}{{ toYaml . | nindent 8 }}{{ end }}
        {{- with include "gmco.lib.secretEnv" . | trim }}{{ . | nindent 8 }}{{ end }}
        {{- with $v.extraEnv }}{{ toYaml . | nindent 8 }}{{ end }}
      startupProbe:
        grpc:
          port: {{ $port }}
        periodSeconds: 5
        failureThreshold: {{ $v.probes.startupFailureThreshold }}
      readinessProbe:
        grpc:
          port: {{ $port }}
        periodSeconds: {{ $v.probes.periodSeconds }}
        timeoutSeconds: {{ $v.probes.timeoutSeconds }}
        failureThreshold: 2
      livenessProbe:
        grpc:
          port: {{ $port }}
        periodSeconds: {{ mul $v.probes.periodSeconds 2 }}
        timeoutSeconds: {{ $v.probes.timeoutSeconds }}
        failureThreshold: {{ $v.probes.livenessFailureThreshold }}
      resources:
        {{- toYaml (.resources | default $v.resources) | nindent 8 }}
      securityContext:
        {{- toYaml $v.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- with .volumeMounts }}{{ toYaml . | nindent 8 }}{{ end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
    {{- with .volumes }}{{ toYaml . | nindent 4 }}{{ end }}
  {{- with (.nodeSelector | default $v.nodeSelector) }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (.tolerations | default $v.tolerations) }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (.affinity | default $v.affinity) }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* The Secret with the bearer token: global.auth.existingSecret, or "<release>-auth" (created by the
umbrella chart from global.auth.token); "" = no auth. */}}
{{- define "gmco.lib.authSecretName" -}}
{{- with .Values.global.auth -}}
{{- if .existingSecret -}}{{ .existingSecret }}{{- else if .token -}}{{ printf "%s-auth" $.Release.Name }}{{- end -}}
{{- end -}}
{{- end -}}
