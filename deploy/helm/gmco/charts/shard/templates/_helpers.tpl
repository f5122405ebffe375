{{/* Settings every shard shares; the shard id and replica id are set per pod. */}}
{{- define "shard.env" -}}
SHARD_COUNT: {{ .Values.global.shards.count | quote }}
DIM: {{ .Values.dim | quote }}
INDEX_BACKEND: {{ .Values.indexBackend | quote }}
SNAPSHOT_DIR: {{ .Values.persistence.mountPath | quote }}
{{- if .Values.catalog.enabled }}
CATALOG_DSN: {{ include "gmco.lib.postgresDsn" . | quote }}
{{- end }}
{{- end -}}

{{/*
The slots of shard $i under SlotMap.even(n): slot s belongs to shard s*n/4096 (integer division), so
shard i holds ceil(i*4096/n) .. ceil((i+1)*4096/n)-1. args: (list i n)
*/}}
{{- define "shard.slotRange" -}}
{{- $i := index . 0 | int -}}
{{- $n := index . 1 | int -}}
{{- $first := div (add (mul $i 4096) $n -1) $n -}}
{{- $next := div (add (mul (add $i 1) 4096) $n -1) $n -}}
{{- printf "%d-%d" $first (sub $next 1) -}}
{{- end -}}

{{- define "shard.name" -}}
{{- printf "%s-%d" (include "gmco.lib.fullname" .ctx) (.shard | int) -}}
{{- end -}}
