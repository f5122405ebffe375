{{/*
deploy/envoy/envoy.yaml.tmpl with its ${NAME} placeholders filled exactly as
gmco_stack.envoy.render_envoy_config fills them (tests/deploy asserts the two are byte-identical):
durations as "<seconds>s" (Python's "{:g}s"), integers in decimal, and the router endpoints as the
JSON flow list Python's json.dumps writes. Here there is one endpoint, the routers' headless Service,
which Envoy resolves with STRICT_DNS into one ring entry per router pod.
*/}}
{{- define "envoy.config" -}}
{{- $p := .Values.proxy -}}
{{- $routerHost := printf "%s-headless.%s.svc.%s" (include "gmco.lib.name" (list . "router")) .Release.Namespace .Values.global.clusterDomain -}}
{{- $endpoints := printf "[{\"endpoint\": {\"address\": {\"socket_address\": {\"address\": \"%s\", \"port_value\": %s}}}}]" $routerHost (include "gmco.lib.grpcPort" "router") -}}
{{- $values := dict
    "LISTEN_ADDRESS" "0.0.0.0"
    "LISTEN_PORT" (include "gmco.lib.grpcPort" "envoy")
    "ADMIN_PORT" (printf "%d" (add (include "gmco.lib.metricsPort" "envoy" | int) 1))
    "METRICS_ADDRESS" "0.0.0.0"
    "METRICS_PORT" (include "gmco.lib.metricsPort" "envoy")
    "ROUTER_DISCOVERY" "STRICT_DNS"
    "ROUTER_ENDPOINTS" $endpoints
    "RING_MIN" (printf "%d" ($p.ringMinSize | int))
    "RING_MAX" (printf "%d" ($p.ringMaxSize | int))
    "RETRIES" (printf "%d" ($p.retries | int))
    "ROUTE_TIMEOUT" (printf "%gs" ($p.routeTimeoutSeconds | float64))
    "HEALTH_INTERVAL" (printf "%gs" ($p.healthIntervalSeconds | float64))
    "HEALTH_TIMEOUT" (printf "%gs" ($p.healthTimeoutSeconds | float64))
    "HEALTH_NO_TRAFFIC_INTERVAL" (printf "%gs" ($p.healthNoTrafficIntervalSeconds | float64))
    "HEALTH_UNHEALTHY_THRESHOLD" (printf "%d" ($p.healthUnhealthyThreshold | int))
    "HEALTH_HEALTHY_THRESHOLD" (printf "%d" ($p.healthHealthyThreshold | int))
    "OUTLIER_CONSECUTIVE_5XX" (printf "%d" ($p.outlierConsecutive5xx | int))
    "OUTLIER_INTERVAL" (printf "%gs" ($p.outlierIntervalSeconds | float64))
    "OUTLIER_BASE_EJECTION" (printf "%gs" ($p.outlierBaseEjectionSeconds | float64))
    "MAX_REQUESTS" (printf "%d" ($p.maxRequests | int))
    "MAX_RETRIES" (printf "%d" ($p.maxRetries | int)) -}}
{{- $config := .Files.Get "files/envoy.yaml.tmpl" -}}
{{- if not $config }}{{ fail "files/envoy.yaml.tmpl is missing: it links to deploy/envoy/envoy.yaml.tmpl" }}{{ end -}}
{{- range $key, $value := $values }}
{{- $config = replace (printf "${%s}" $key) $value $config -}}
{{- end -}}
{{- with regexFind "\\$\\{[A-Z_0-9]+\\}" $config }}{{ fail (printf "deploy/envoy/envoy.yaml.tmpl has a placeholder the chart does not fill: %s" .) }}{{ end -}}
{{- $config -}}
{{- end -}}
