{{/* Objects every component renders the same way. */}}

{{/*
A Service for a component's pods. args: dict "ctx" $ "name" n "headless" bool "selector" {} "labels" {}
"scrape" bool: the one Service per pod set that the ServiceMonitor scrapes (so no pod is scraped twice);
"type", "annotations" and "noMetrics" (leave the metrics port out) for a public Service.
*/}}
{{- define "gmco.lib.service" -}}
{{- $ctx := .ctx -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ .name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "gmco.lib.labels" $ctx | nindent 4 }}
    {{- with .labels }}{{ toYaml . | nindent 4 }}{{ end }}
    {{- if .scrape }}
    gmco.io/scrape: "true"
    {{- end }}
  {{- with .annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if .headless }}
  clusterIP: None
  {{- else }}
  type: {{ .type | default "ClusterIP" }}
  {{- end }}
  selector:
    {{- include "gmco.lib.selectorLabels" $ctx | nindent 4 }}
    {{- with .selector }}{{ toYaml . | nindent 4 }}{{ end }}
  ports:
    - name: grpc
      port: {{ include "gmco.lib.grpcPort" $ctx.Chart.Name }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if not .noMetrics }}
    - name: metrics
      port: {{ include "gmco.lib.metricsPort" $ctx.Chart.Name }}
      targetPort: metrics
      protocol: TCP
    {{- end }}
{{- end -}}

{{- define "gmco.lib.serviceAccount" -}}
{{- if .Values.serviceAccount.create }}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "gmco.lib.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gmco.lib.labels" . | nindent 4 }}
automountServiceAccountToken: false
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget. args: dict "ctx" $ "name" n "selector" {} */}}
{{- define "gmco.lib.pdb" -}}
{{- $ctx := .ctx -}}
{{- if $ctx.Values.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "gmco.lib.labels" $ctx | nindent 4 }}
spec:
  {{- if hasKey $ctx.Values.pdb "minAvailable" }}
  minAvailable: {{ $ctx.Values.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $ctx.Values.pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "gmco.lib.selectorLabels" $ctx | nindent 6 }}
      {{- with .selector }}{{ toYaml . | nindent 6 }}{{ end }}
{{- end }}
{{- end -}}

{{/* A HorizontalPodAutoscaler (autoscaling/v2). args: dict "ctx" $ "kind" "Deployment" "name" n */}}
{{- define "gmco.lib.hpa" -}}
{{- $ctx := .ctx -}}
{{- $hpa := $ctx.Values.hpa -}}
{{- if $hpa.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "gmco.lib.labels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: {{ .kind }}
    name: {{ .name }}
  minReplicas: {{ $hpa.minReplicas }}
  maxReplicas: {{ $hpa.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $hpa.targetCPUUtilizationPercentage }}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: {{ $hpa.scaleDownStabilizationSeconds }}
{{- end }}
{{- end -}}

{{/* A Deployment of a stateless component (replicas left to the HPA when it is on). */}}
{{- define "gmco.lib.deployment" -}}
{{- $ctx := .ctx -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "gmco.lib.fullname" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "gmco.lib.labels" $ctx | nindent 4 }}
spec:
  {{- if not $ctx.Values.hpa.enabled }}
  replicas: {{ $ctx.Values.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "gmco.lib.selectorLabels" $ctx | nindent 6 }}
  template:
    {{- include "gmco.lib.podTemplate" . | nindent 4 }}
{{- end -}}

{{/*
A ServiceMonitor for the component's "metrics" Service port, rendered only where the Prometheus
Operator's CRDs are installed.
*/}}
{{- define "gmco.lib.serviceMonitor" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "gmco.lib.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gmco.lib.labels" . | nindent 4 }}
    {{- with .Values.metrics.serviceMonitor.labels }}{{ toYaml . | nindent 4 }}{{ end }}
spec:
  selector:
    matchLabels:
      {{- include "gmco.lib.selectorLabels" . | nindent 6 }}
      gmco.io/scrape: "true"
  namespaceSelector:
    matchNames: [{{ .Release.Namespace }}]
  endpoints:
    - port: metrics
      path: {{ dig "path" "/metrics" .Values.metrics }}
      interval: {{ .Values.metrics.serviceMonitor.interval }}
      scrapeTimeout: {{ .Values.metrics.serviceMonitor.scrapeTimeout }}
      relabelings:
        # A shard pod's series carry its shard id (dashboards and alerts group by it).
        - sourceLabels: [__meta_kubernetes_pod_label_gmco_io_shard]
          targetLabel: shard
{{- end }}
{{- end -}}

{{/*
Everything a stateless GMC-O server renders: its env ConfigMap, a Deployment, a ClusterIP Service (and a
headless one when args.headless, whose DNS answer lists every pod), HPA, PDB, NetworkPolicy,
ServiceAccount and ServiceMonitor. args: dict "ctx" $ "env" {} "secretEnv" [] "headless" bool
"checksumExtra" (more configuration the pods read, e.g. a mounted ConfigMap's data, so that a change rolls
them), the pod template's "volumes" "volumeMounts", plus the NetworkPolicy's "from" "to" "public" "stores"
(see gmco.lib.networkPolicy).
*/}}
{{- define "gmco.lib.component" -}}
{{- $ctx := .ctx -}}
{{- $name := include "gmco.lib.fullname" $ctx -}}
{{- $checksum := print (include "gmco.lib.envData" .) (.checksumExtra | default "") | sha256sum -}}
{{ include "gmco.lib.envConfigMap" . }}
---
{{ include "gmco.lib.deployment" (merge (dict "checksum" $checksum) .) }}
---
{{ include "gmco.lib.service" (dict "ctx" $ctx "name" $name "scrape" true) }}
{{- if .headless }}
---
{{ include "gmco.lib.service" (dict "ctx" $ctx "name" (printf "%s-headless" $name) "headless" true) }}
{{- end }}
---
{{ include "gmco.lib.hpa" (dict "ctx" $ctx "kind" "Deployment" "name" $name) }}
---
{{ include "gmco.lib.pdb" (dict "ctx" $ctx "name" $name) }}
---
{{ include "gmco.lib.networkPolicy" . }}
---
{{ include "gmco.lib.serviceAccount" $ctx }}
---
{{ include "gmco.lib.serviceMonitor" $ctx }}
{{- end -}}
