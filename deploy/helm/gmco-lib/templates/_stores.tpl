{{/*
External stores. Their addresses are values; their credentials come from Secrets the operator already
has (the chart never creates or reads a password).
*/}}

{{/* libpq key/value DSN without the password (libpq reads PGPASSWORD, see gmco.lib.postgresSecretEnv). */}}
{{- define "gmco.lib.postgresDsn" -}}
{{- with .Values.global.postgres -}}
{{- printf "host=%s port=%v dbname=%s user=%s sslmode=%s application_name=gmco" .host .port .database .user .sslmode -}}
{{- end -}}
{{- end -}}

{{- define "gmco.lib.postgresSecretEnv" -}}
{{- with .Values.global.postgres -}}
{{- list (dict "name" "PGPASSWORD" "secret" (required "global.postgres.existingSecret: name the Secret that holds the PostgreSQL password" .existingSecret) "key" .passwordKey) | toYaml -}}
{{- end -}}
{{- end -}}
