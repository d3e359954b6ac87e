{{/*
Helpers for the pubwarden chart.

The sidecar templates (pubwarden.sidecar.*) are also called from other charts,
with a context that holds only `Values` (this chart's values, e.g.
`.Values.pubwarden` of the parent) and `Release`:

  {{ include "pubwarden.sidecar.container" (dict "Values" .Values.pubwarden "Release" .Release) }}

So the helpers they use never read `.Chart`, `.Files` or `.Capabilities`, and
the chart name in resource names is the literal "pubwarden" (the name this
chart's own templates use too, so both sides agree on ConfigMap names).
*/}}

{{/*
Expand the name of the chart.
*/}}
{{- define "pubwarden.name" -}}
{{- default "pubwarden" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name (63 characters: the DNS label limit).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "pubwarden.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "pubwarden" .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "pubwarden.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "pubwarden.labels" -}}
helm.sh/chart: {{ include "pubwarden.chart" . }}
{{ include "pubwarden.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "pubwarden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pubwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "pubwarden.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pubwarden.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository@digest, or repository:tag (the tag defaults
to the appVersion; a sidecar included from another chart has no access to
this chart's appVersion, so there image.tag or image.digest is required).
*/}}
{{- define "pubwarden.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $appVersion := "" }}
{{- if .Chart }}{{ $appVersion = .Chart.AppVersion }}{{ end }}
{{- $tag := .Values.image.tag | default $appVersion }}
{{- if not $tag }}
{{- fail "pubwarden: set image.tag (or image.digest) for the sidecar, e.g. pubwarden.image.tag in the parent chart" }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Names of the ConfigMaps (rendered or existing). */}}
{{- define "pubwarden.configMapName" -}}
{{- .Values.config.existingConfigMap | default (printf "%s-config" (include "pubwarden.fullname" .)) }}
{{- end }}

{{- define "pubwarden.policyConfigMapName" -}}
{{- .Values.policy.existingConfigMap | default (printf "%s-policy" (include "pubwarden.fullname" .)) }}
{{- end }}

{{/* Whether a policy is mounted: "true" or "". */}}
{{- define "pubwarden.policyEnabled" -}}
{{- if or .Values.policy.enabled .Values.policy.existingConfigMap }}true{{ end }}
{{- end }}

{{/*
The settings file as rendered into the ConfigMap: config.settings with
shutdown.drain_timeout from shutdown.drainTimeoutSeconds. listen,
admin.listen and the policy path come from environment variables (see
pubwarden.container), which win over the file.
*/}}
{{- define "pubwarden.settings" -}}
{{- $settings := deepCopy (.Values.config.settings | default dict) }}
{{- $shutdown := deepCopy (get $settings "shutdown" | default dict) }}
{{- $_ := set $shutdown "drain_timeout" (printf "%ds" (int .Values.shutdown.drainTimeoutSeconds)) }}
{{- $_ := set $settings "shutdown" $shutdown }}
{{- toYaml $settings }}
{{- end }}

{{/* The policy file as rendered into the ConfigMap: a string verbatim, a map as YAML. */}}
{{- define "pubwarden.policy" -}}
{{- if kindIs "string" .Values.policy.content }}
{{- .Values.policy.content }}
{{- else }}
{{- toYaml (.Values.policy.content | default dict) }}
{{- end }}
{{- end }}

{{/* The address clients connect to. */}}
{{- define "pubwarden.listenHost" -}}
{{- if .Values.listenHost }}
{{- .Values.listenHost }}
{{- else if eq .Values.mode "sidecar" }}
{{- "127.0.0.1" }}
{{- else }}
{{- "0.0.0.0" }}
{{- end }}
{{- end }}

{{/* terminationGracePeriodSeconds that covers preStop sleep + drain + slack. */}}
{{- define "pubwarden.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- add (int $s.preStopSleepSeconds) (int $s.drainTimeoutSeconds) (int $s.extraGraceSeconds) }}
{{- end }}

{{/*
The pubwarden container (a single list item), shared by the gateway
Deployment and the sidecar. Context: Values, Release (and optionally Chart).
*/}}
{{- define "pubwarden.container" -}}
{{- $native := and (eq .Values.mode "sidecar") .Values.sidecar.native -}}
- name: {{ if eq .Values.mode "sidecar" }}{{ .Values.sidecar.containerName }}{{ else }}pubwarden{{ end }}
  image: {{ include "pubwarden.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if $native }}
  # A native sidecar: starts before the app's containers, stops after them.
  restartPolicy: Always
  {{- end }}
  env:
    - name: PUBWARDEN_CONFIG
      value: /etc/pubwarden/config/pubwarden.yaml
    - name: PUBWARDEN_LISTEN
      value: {{ printf "%s:%d" (include "pubwarden.listenHost" .) (int .Values.ports.resp) | quote }}
    - name: PUBWARDEN_ADMIN_LISTEN
      value: {{ printf "%s:%d" .Values.adminListenHost (int .Values.ports.admin) | quote }}
    {{- if include "pubwarden.policyEnabled" . }}
    - name: PUBWARDEN_POLICY
      value: /etc/pubwarden/policy/policy.yaml
    {{- end }}
    {{- with .Values.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: pubwarden-resp
      containerPort: {{ .Values.ports.resp }}
      protocol: TCP
    - name: pubwarden-admin
      containerPort: {{ .Values.ports.admin }}
      protocol: TCP
  {{- with .Values.startupProbe }}
  startupProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and (not $native) (gt (int .Values.shutdown.preStopSleepSeconds) 0) }}
  lifecycle:
    # Keep serving while endpoints and clients move away; then SIGTERM
    # starts pubwarden's drain (shutdown.drain_timeout).
    preStop:
      sleep:
        seconds: {{ int .Values.shutdown.preStopSleepSeconds }}
  {{- end }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: pubwarden-config
      mountPath: /etc/pubwarden/config
      readOnly: true
    {{- if include "pubwarden.policyEnabled" . }}
    # A directory mount (no subPath), so that ConfigMap updates reach the
    # running container and pubwarden reloads the policy.
    - name: pubwarden-policy
      mountPath: /etc/pubwarden/policy
      readOnly: true
    {{- end }}
    {{- range .Values.secretMounts }}
    - name: {{ printf "pubwarden-secret-%s" .name | trunc 63 | trimSuffix "-" }}
      mountPath: {{ printf "/etc/pubwarden/secrets/%s" .name }}
      readOnly: true
    {{- end }}
    {{- with .Values.volumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
The volumes of the pubwarden container (list items).
*/}}
{{- define "pubwarden.volumes" -}}
- name: pubwarden-config
  configMap:
    name: {{ include "pubwarden.configMapName" . }}
    items:
      - key: {{ .Values.config.existingConfigMapKey | default "pubwarden.yaml" }}
        path: pubwarden.yaml
{{- if include "pubwarden.policyEnabled" . }}
- name: pubwarden-policy
  configMap:
    name: {{ include "pubwarden.policyConfigMapName" . }}
    items:
      - key: {{ .Values.policy.existingConfigMapKey | default "policy.yaml" }}
        path: policy.yaml
{{- end }}
{{- range .Values.secretMounts }}
- name: {{ printf "pubwarden-secret-%s" .name | trunc 63 | trimSuffix "-" }}
  secret:
    secretName: {{ .secretName }}
    {{- if .optional }}
    optional: true
    {{- end }}
{{- end }}
{{- end }}

{{/*
Pod annotations: config checksums (so that a settings change restarts pods)
and Prometheus scrape annotations. Rendered as map entries.
*/}}
{{- define "pubwarden.podAnnotations" -}}
{{- if and .Values.config.restartOnChange (not .Values.config.existingConfigMap) }}
checksum/pubwarden-config: {{ include "pubwarden.settings" . | sha256sum }}
{{- end }}
{{- if and .Values.policy.restartOnChange .Values.policy.enabled (not .Values.policy.existingConfigMap) }}
checksum/pubwarden-policy: {{ include "pubwarden.policy" . | sha256sum }}
{{- end }}
{{- if .Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.ports.admin | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* ===================== Sidecar API, for other charts ===================== */}}

{{/*
pubwarden.sidecar.container: the pubwarden container, a list item to put
under `initContainers:` when Values.sidecar.native is true (the default),
under `containers:` otherwise. Call with
  (dict "Values" .Values.pubwarden "Release" .Release)
*/}}
{{- define "pubwarden.sidecar.container" -}}
{{- if ne .Values.mode "sidecar" }}
{{- fail "pubwarden.sidecar.container: set mode: sidecar in the pubwarden values (e.g. pubwarden.mode in the parent chart)" }}
{{- end }}
{{- include "pubwarden.container" . }}
{{- end }}

{{/* pubwarden.sidecar.volumes: the volumes the sidecar mounts (list items). */}}
{{- define "pubwarden.sidecar.volumes" -}}
{{- include "pubwarden.volumes" . }}
{{- end }}

{{/* pubwarden.sidecar.podAnnotations: checksums and scrape annotations (map entries). */}}
{{- define "pubwarden.sidecar.podAnnotations" -}}
{{- include "pubwarden.podAnnotations" . | trim }}
{{- end }}

{{/* pubwarden.sidecar.podLabels: the label the sidecar PodMonitor selects on (map entry). */}}
{{- define "pubwarden.sidecar.podLabels" -}}
pubwarden/sidecar: {{ include "pubwarden.fullname" . }}
{{- end }}

{{/*
pubwarden.sidecar.terminationGracePeriodSeconds: the seconds pubwarden needs
to stop; add the app's own shutdown time to it.
*/}}
{{- define "pubwarden.sidecar.terminationGracePeriodSeconds" -}}
{{- include "pubwarden.terminationGracePeriodSeconds" . }}
{{- end }}
