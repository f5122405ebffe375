{{/* Settings every shard shares; the shard id, replica id and slot map are set per StatefulSet. */}}
{{- define "shard.env" -}}
SHARD_COUNT: {{ .Values.global.shards.count | quote }}
DIM: {{ .Values.dim | quote }}
INDEX_BACKEND: {{ .Values.indexBackend | quote }}
SNAPSHOT_DIR: {{ .Values.persistence.mountPath | quote }}
{{- if .Values.global.catalog.enabled }}
CATALOG_DSN: {{ include "gmco.lib.postgresDsn" . | quote }}
{{- end }}
{{- if gt (int .Values.demoCatalogue.items) 0 }}
DATA_DIR: {{ include "shard.demoDir" . | quote }}
{{- end }}
{{- end -}}

{{- define "shard.demoDir" -}}/var/lib/gmco/demo-catalogue{{- end -}}

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

{{/* The slot map shard $i tails by: slotMapPerShard["i"], else slotMap ("" = the even map). args: dict "ctx" $ "shard" i */}}
{{- define "shard.slotMapName" -}}
{{- index .ctx.Values.slotMapPerShard (toString .shard) | default .ctx.Values.slotMap -}}
{{- end -}}

{{/* Every slot map some shard uses, as ConfigMap data ("<name>.json": JSON). */}}
{{- define "shard.slotMapData" -}}
{{- $root := . -}}
{{- $names := list -}}
{{- range $i := until (.Values.global.shards.count | int) }}
{{- with include "shard.slotMapName" (dict "ctx" $root "shard" $i) }}{{ $names = append $names . }}{{ end }}
{{- end -}}
{{- range $name := $names | uniq | sortAlpha }}
{{ $name }}.json: {{ include "gmco.lib.slotMapJson" (list $root $name) | quote }}
{{- end -}}
{{- end -}}
