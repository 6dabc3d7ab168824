{{/* Names and labels. */}}
{{- define "kvcache-exporter.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvcache-exporter.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvcache-exporter.engineName" -}}
{{- printf "%s-%s" .Release.Name .Values.engine.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvcache-exporter.eventsService" -}}
{{- printf "%s-events" (include "kvcache-exporter.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvcache-exporter.chartLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Pods of the example engine. */}}
{{- define "kvcache-exporter.engineSelector" -}}
app.kubernetes.io/name: {{ .Values.engine.name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Pods of the per-node exporter. */}}
{{- define "kvcache-exporter.exporterSelector" -}}
app.kubernetes.io/name: {{ include "kvcache-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The pods that serve the metrics port in this mode. */}}
{{- define "kvcache-exporter.metricsSelector" -}}
{{- if eq .Values.mode "daemonset" -}}
{{ include "kvcache-exporter.exporterSelector" . }}
{{- else -}}
{{ include "kvcache-exporter.engineSelector" . }}
{{- end -}}
{{- end -}}

{{- define "kvcache-exporter.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Checks that no schema can express. */}}
{{- define "kvcache-exporter.validate" -}}
{{- with .Values.webConfig -}}
{{- if and (or .tls .authRequired) (not .secretName) -}}
{{- fail "webConfig.tls / webConfig.authRequired describe the file in webConfig.secretName: set it" -}}
{{- end -}}
{{- if and .tls (not .scrape.tlsConfig) -}}
{{- fail "webConfig.tls: set webConfig.scrape.tlsConfig (ca and serverName, or insecureSkipVerify) so that Prometheus can scrape over TLS" -}}
{{- end -}}
{{- if and .authRequired (not .scrape.basicAuth) (not (and .scrape.tlsConfig .scrape.tlsConfig.cert)) -}}
{{- fail "webConfig.authRequired: give Prometheus credentials in webConfig.scrape.basicAuth or a client certificate in webConfig.scrape.tlsConfig" -}}
{{- end -}}
{{- if and .authRequired (eq $.Values.readinessProbePath "/readyz") -}}
{{- fail "readinessProbePath /readyz with webConfig.authRequired: the probes are TCP checks, which cannot read /readyz" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.podMonitor.enabled .Values.serviceMonitor.enabled -}}
{{- fail "podMonitor.enabled and serviceMonitor.enabled: choose one, both would scrape every exporter twice" -}}
{{- end -}}
{{- if and (eq .Values.mode "daemonset") (eq .Values.readinessProbePath "/readyz") -}}
{{- fail "readinessProbePath /readyz in daemonset mode: a node exporter is ready only once every slot has an engine, and a not-ready one drops out of the events Service its engines need" -}}
{{- end -}}
{{- if and (eq .Values.mode "sidecar") (not .Values.engine.enabled) -}}
{{- fail "mode sidecar needs engine.enabled: the exporter runs in the engine's pods" -}}
{{- end -}}
{{- end -}}

{{/* --source flags for this mode. */}}
{{- define "kvcache-exporter.sources" -}}
{{- $sources := .Values.sources -}}
{{- if not $sources -}}
{{- if eq .Values.mode "daemonset" -}}
{{- $sources = list -}}
{{- range $slot := until (int .Values.daemonset.slots) -}}
{{- $sources = append $sources (dict "name" (printf "%s%d" $.Values.daemonset.sourcePrefix $slot) "endpoint" (printf "tcp://*:%d" (add $.Values.daemonset.basePort $slot))) -}}
{{- end -}}
{{- else -}}
{{- $sources = list (dict "name" .Values.engine.name "endpoint" (printf "tcp://127.0.0.1:%d" (int .Values.engine.eventsPort)) "replay" (printf "tcp://127.0.0.1:%d" (int .Values.engine.replayPort))) -}}
{{- end -}}
{{- end -}}
{{- range $sources }}
- --source={{ .name }}={{ .endpoint }}{{ with .replay }},replay={{ . }}{{ end }}{{ with .topic }},topic={{ . }}{{ end }}{{ if .bind }},bind{{ end }}
{{- end -}}
{{- end -}}

{{/*
The exporter container. Context: dict "root" $ "native" bool "resources" map "eventPorts" list.
*/}}
{{- define "kvcache-exporter.container" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
- name: kvcache-exporter
  image: {{ include "kvcache-exporter.image" $root }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if .native }}
  restartPolicy: Always
  {{- end }}
  args:
    {{- include "kvcache-exporter.sources" $root | trim | nindent 4 }}
    - --web.listen-address=:{{ int $v.service.port }}
    - --collector.sample-ratio={{ $v.sampleRatio }}
    - --collector.max-tracked-blocks={{ int64 $v.maxTrackedBlocks }}
    - --collector.removed-memory={{ int64 $v.removedMemory }}
    {{- with $v.otlp.endpoint }}
    - --otlp.endpoint={{ . }}
    - --otlp.protocol={{ $v.otlp.protocol }}
    - --otlp.interval={{ $v.otlp.interval }}
    {{- end }}
    - --log.level={{ $v.log.level }}
    - --log.format={{ $v.log.format }}
    {{- if $v.webConfig.secretName }}
    - --web.config.file=/etc/kvcache-exporter/web/web-config.yml
    {{- end }}
    {{- range $v.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  {{- if or $v.otlp.endpoint $v.extraEnv }}
  env:
    {{- if $v.otlp.endpoint }}
    - name: K8S_NAMESPACE_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    - name: K8S_POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: K8S_POD_UID
      valueFrom:
        fieldRef:
          fieldPath: metadata.uid
    - name: K8S_NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    - name: K8S_CONTAINER_NAME
      value: kvcache-exporter
    {{- with $v.otlp.resourceAttributes }}
    - name: OTEL_RESOURCE_ATTRIBUTES
      value: {{ include "kvcache-exporter.attributes" . | quote }}
    {{- end }}
    {{- with $v.otlp.headersSecret.name }}
    - name: KVCACHE_EXPORTER_OTLP_HEADERS
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $v.otlp.headersSecret.key }}
    {{- end }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  ports:
    - name: kvcache-metrics
      containerPort: {{ int $v.service.port }}
      protocol: TCP
    {{- range $i, $port := .eventPorts }}
    - name: events-{{ $i }}
      containerPort: {{ $port }}
      protocol: TCP
    {{- end }}
  startupProbe:
    {{- include "kvcache-exporter.probe" (dict "root" $root "path" "/healthz") | nindent 4 }}
    periodSeconds: 1
    failureThreshold: 30
  livenessProbe:
    {{- include "kvcache-exporter.probe" (dict "root" $root "path" "/healthz") | nindent 4 }}
    periodSeconds: 10
    timeoutSeconds: 2
    failureThreshold: 3
  readinessProbe:
    {{- include "kvcache-exporter.probe" (dict "root" $root "path" $v.readinessProbePath) | nindent 4 }}
    periodSeconds: 10
    timeoutSeconds: 2
  resources:
    {{- toYaml .resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  {{- if $v.webConfig.secretName }}
  volumeMounts:
    - name: kvcache-exporter-web-config
      mountPath: /etc/kvcache-exporter/web
      readOnly: true
  {{- end }}
{{- end -}}

{{/*
A probe's action: HTTP(S) on the metrics port, or a TCP check where the web config requires
credentials (which would otherwise have to be written into the pod spec).
*/}}
{{- define "kvcache-exporter.probe" -}}
{{- $web := .root.Values.webConfig -}}
{{- if and $web.secretName $web.authRequired -}}
tcpSocket:
  port: kvcache-metrics
{{- else -}}
httpGet:
  path: {{ .path }}
  port: kvcache-metrics
  {{- if and $web.secretName $web.tls }}
  scheme: HTTPS
  {{- end }}
{{- end -}}
{{- end -}}

{{/* The pod volume holding the web config, when there is one. */}}
{{- define "kvcache-exporter.webConfigVolume" -}}
{{- with .Values.webConfig.secretName }}
- name: kvcache-exporter-web-config
  secret:
    secretName: {{ . }}
    # Readable by the exporter's user; only the exporter's container mounts it.
    defaultMode: 0444
{{- end }}
{{- end -}}

{{/* The monitors' endpoint settings for the web config. */}}
{{- define "kvcache-exporter.scrapeAuth" -}}
{{- with .Values.webConfig -}}
{{- if .secretName -}}
{{- if .tls }}
scheme: https
{{- end }}
{{- with .scrape.tlsConfig }}
tlsConfig:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .scrape.basicAuth }}
basicAuth:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvcache-exporter.attributes" -}}
{{- $pairs := list -}}
{{- range $key, $value := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* The engine's --kv-events-config JSON for this mode. */}}
{{- define "kvcache-exporter.kvEventsConfig" -}}
{{- $config := deepCopy .Values.engine.kvEventsConfig -}}
{{- if eq .Values.mode "daemonset" -}}
{{- $_ := set $config "endpoint" (printf "tcp://%s:%d" (include "kvcache-exporter.eventsService" .) (int .Values.daemonset.basePort)) -}}
{{- else -}}
{{- $_ := set $config "endpoint" (printf "tcp://*:%d" (int .Values.engine.eventsPort)) -}}
{{- $_ := set $config "replay_endpoint" (printf "tcp://*:%d" (int .Values.engine.replayPort)) -}}
{{- end -}}
{{- toJson $config -}}
{{- end -}}
