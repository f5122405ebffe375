{{/*
Backing stores: PostgreSQL (the catalogue log and rl_state), Redis (the cache) and Neo4j (the ontology).
Whether a component uses one is its own value (cache.backend, ontology.backend, rl-state.backend,
global.catalog.enabled); where the store is, is global.<store>.mode:
  external    addresses in global.<store> (host/port, nodes, uri), reached by ipBlock (global.<store>.cidrs)
  in-cluster  one StatefulSet the umbrella chart runs, "<release>-postgres" / "<release>-redis"
              (PostgreSQL and Redis only), reached by podSelector
Credentials: global.<store>.existingSecret when set (a Secret you made), else "<release>-<store>", a Secret
the umbrella chart creates from global.<store>.password (or, for an in-cluster store, a generated one).
*/}}

{{/* "true" when global.<store>.mode is in-cluster; args: (list $ctx "postgres") */}}
{{- define "gmco.lib.storeInCluster" -}}
{{- if eq ((index (index . 0).Values.global (index . 1)).mode | default "external") "in-cluster" }}true{{ end -}}
{{- end -}}

{{/* The Secret holding a store's password ("" = none: an external Redis without AUTH). args: (list $ctx "redis") */}}
{{- define "gmco.lib.storeSecretName" -}}
{{- $ctx := index . 0 -}}
{{- $store := index . 1 -}}
{{- $cfg := index $ctx.Values.global $store -}}
{{- if $cfg.existingSecret -}}
{{- $cfg.existingSecret -}}
{{- else if or $cfg.password (include "gmco.lib.storeInCluster" .) -}}
{{- printf "%s-%s" $ctx.Release.Name $store -}}
{{- else if ne $store "redis" -}}
{{- fail (printf "global.%s: set existingSecret (the name of a Secret you created) or password (the chart then creates the Secret %s-%s)" $store $ctx.Release.Name $store) -}}
{{- end -}}
{{- end -}}

{{/* A store's password as an EnvVar list (YAML) named $name, or [] when it has none. args: (list $ctx "postgres" "PGPASSWORD") */}}
{{- define "gmco.lib.storeSecretEnv" -}}
{{- $secret := include "gmco.lib.storeSecretName" (list (index . 0) (index . 1)) -}}
{{- $key := (index (index . 0).Values.global (index . 1)).passwordKey | default "password" -}}
{{- if $secret -}}
{{- list (dict "name" (index . 2) "secret" $secret "key" $key) | toYaml -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{/* PostgreSQL's host: the in-cluster Service, or global.postgres.host. */}}
{{- define "gmco.lib.postgresHost" -}}
{{- if include "gmco.lib.storeInCluster" (list . "postgres") -}}
{{- include "gmco.lib.fqdn" (list . "postgres") -}}
{{- else -}}
{{- .Values.global.postgres.host -}}
{{- end -}}
{{- end -}}

{{/* libpq key/value DSN without the password (libpq reads PGPASSWORD, see gmco.lib.postgresSecretEnv). */}}
{{- define "gmco.lib.postgresDsn" -}}
{{- $host := include "gmco.lib.postgresHost" . -}}
{{- $inCluster := include "gmco.lib.storeInCluster" (list . "postgres") -}}
{{- with .Values.global.postgres -}}
{{- printf "host=%s port=%v dbname=%s user=%s sslmode=%s application_name=gmco" $host (ternary 5432 .port (eq $inCluster "true")) .database .user (ternary "disable" .sslmode (eq $inCluster "true")) -}}
{{- end -}}
{{- end -}}

{{- define "gmco.lib.postgresSecretEnv" -}}
{{- include "gmco.lib.storeSecretEnv" (list . "postgres" "PGPASSWORD") -}}
{{- end -}}

{{/* The in-cluster Redis's URL (BACKEND=redis); the password comes from GMCO_CACHE_REDIS_PASSWORD. */}}
{{- define "gmco.lib.redisUrl" -}}
{{- printf "redis://%s:6379/0" (include "gmco.lib.fqdn" (list . "redis")) -}}
{{- end -}}
