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
Where the chart mounts the TLS Secrets (directory mounts, no subPath, so that
the kubelet swaps renewed certificates in place and pubwarden, which re-reads
them when their content changes, rotates without a restart).
helm/chart_check.py `render` mirrors these paths.
*/}}
{{- define "pubwarden.tlsDir" -}}/etc/pubwarden/tls{{- end }}
{{- define "pubwarden.tlsClientCaDir" -}}/etc/pubwarden/tls-client-ca{{- end }}
{{- define "pubwarden.upstreamCaDir" -}}/etc/pubwarden/upstream-ca{{- end }}
{{- define "pubwarden.upstreamClientDir" -}}/etc/pubwarden/upstream-client{{- end }}

{{/* Whether the client CA comes from tls.clientCaSecretName: "true" or "". */}}
{{- define "pubwarden.tlsClientCaMounted" -}}
{{- if and .Values.tls.enabled (ne .Values.tls.clientAuth "none") .Values.tls.clientCaSecretName }}true{{ end }}
{{- end }}

{{/*
Refuses TLS values that cannot work, with the value to fix. Renders nothing.
Called by pubwarden.settings and pubwarden.container, so that a sidecar
included from another chart is checked too.
*/}}
{{- define "pubwarden.validateTls" -}}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.secretName }}
{{- fail "pubwarden: tls.enabled needs tls.secretName, a kubernetes.io/tls Secret (tls.crt, tls.key; e.g. a cert-manager Certificate's secretName)" }}
{{- end }}
{{- if and (not .Values.tls.only) (eq (int .Values.tls.port) (int .Values.ports.resp)) }}
{{- fail (printf "pubwarden: tls.port (%d) must differ from ports.resp, or set tls.only: true to serve TLS alone" (int .Values.tls.port)) }}
{{- end }}
{{- if eq (int .Values.tls.port) (int .Values.ports.admin) }}
{{- fail (printf "pubwarden: tls.port (%d) must differ from ports.admin" (int .Values.tls.port)) }}
{{- end }}
{{- end }}
{{- if .Values.upstreamTls.enabled }}
{{- if and .Values.upstreamTls.insecureSkipVerify .Values.upstreamTls.caSecretName }}
{{- fail "pubwarden: upstreamTls.insecureSkipVerify contradicts upstreamTls.caSecretName (the CA would not be used); drop one" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The settings file as rendered into the ConfigMap: config.settings with
shutdown.drain_timeout from shutdown.drainTimeoutSeconds, and the `tls:` and
`upstream.tls:` sections from the tls.* and upstreamTls.* values when those
are enabled (the keys the chart sets there are refused in config.settings;
other keys, e.g. tls.handshake_timeout, are kept). listen, admin.listen and
the policy path come from environment variables (see pubwarden.container),
which win over the file.
*/}}
{{- define "pubwarden.settings" -}}
{{- include "pubwarden.validateTls" . }}
{{- $settings := deepCopy (.Values.config.settings | default dict) }}
{{- $shutdown := deepCopy (get $settings "shutdown" | default dict) }}
{{- $_ := set $shutdown "drain_timeout" (printf "%ds" (int .Values.shutdown.drainTimeoutSeconds)) }}
{{- $_ := set $settings "shutdown" $shutdown }}
{{- if .Values.tls.enabled }}
{{- $tls := deepCopy (get $settings "tls" | default dict) }}
{{- $owned := dict "listen" "tls.port and tls.listenHost (or listenHost)" "cert_file" "tls.secretName" "key_file" "tls.secretName" "client_ca_file" "tls.clientAuth, tls.clientCaSecretName and tls.clientCaKey" "client_auth" "tls.clientAuth" "only" "tls.only" }}
{{- range $key, $from := $owned }}
{{- if hasKey $tls $key }}
{{- fail (printf "pubwarden: config.settings.tls.%s is set by the chart when tls.enabled is true (from %s); remove it from config.settings" $key $from) }}
{{- end }}
{{- end }}
{{- $host := .Values.tls.listenHost | default (include "pubwarden.listenHost" .) }}
{{- $_ := set $tls "listen" (printf "%s:%d" $host (int .Values.tls.port)) }}
{{- $_ := set $tls "cert_file" (printf "%s/tls.crt" (include "pubwarden.tlsDir" .)) }}
{{- $_ := set $tls "key_file" (printf "%s/tls.key" (include "pubwarden.tlsDir" .)) }}
{{- if ne .Values.tls.clientAuth "none" }}
{{- if include "pubwarden.tlsClientCaMounted" . }}
{{- $_ := set $tls "client_ca_file" (printf "%s/%s" (include "pubwarden.tlsClientCaDir" .) .Values.tls.clientCaKey) }}
{{- else }}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" (include "pubwarden.tlsDir" .)) }}
{{- end }}
{{- end }}
{{- $_ := set $tls "client_auth" .Values.tls.clientAuth }}
{{- $_ := set $tls "only" .Values.tls.only }}
{{- $_ := set $settings "tls" $tls }}
{{- end }}
{{- if .Values.upstreamTls.enabled }}
{{- $upstream := deepCopy (get $settings "upstream" | default dict) }}
{{- if hasPrefix "redis://" (get $upstream "address" | default "" | toString) }}
{{- fail "pubwarden: upstreamTls.enabled contradicts config.settings.upstream.address redis://... (plaintext): write rediss://host:port or host:port" }}
{{- end }}
{{- $utls := deepCopy (get $upstream "tls" | default dict) }}
{{- $owned := dict "ca_file" "upstreamTls.caSecretName and upstreamTls.caKey" "server_name" "upstreamTls.serverName" "cert_file" "upstreamTls.clientCertSecretName" "key_file" "upstreamTls.clientCertSecretName" "insecure_skip_verify" "upstreamTls.insecureSkipVerify" }}
{{- range $key, $from := $owned }}
{{- if hasKey $utls $key }}
{{- fail (printf "pubwarden: config.settings.upstream.tls.%s is set by the chart when upstreamTls.enabled is true (from %s); remove it from config.settings" $key $from) }}
{{- end }}
{{- end }}
{{- if .Values.upstreamTls.caSecretName }}
{{- $_ := set $utls "ca_file" (printf "%s/%s" (include "pubwarden.upstreamCaDir" .) .Values.upstreamTls.caKey) }}
{{- end }}
{{- if .Values.upstreamTls.serverName }}
{{- $_ := set $utls "server_name" .Values.upstreamTls.serverName }}
{{- end }}
{{- if .Values.upstreamTls.clientCertSecretName }}
{{- $_ := set $utls "cert_file" (printf "%s/tls.crt" (include "pubwarden.upstreamClientDir" .)) }}
{{- $_ := set $utls "key_file" (printf "%s/tls.key" (include "pubwarden.upstreamClientDir" .)) }}
{{- end }}
{{- $_ := set $utls "insecure_skip_verify" .Values.upstreamTls.insecureSkipVerify }}
{{- $_ := set $upstream "tls" $utls }}
{{- $_ := set $settings "upstream" $upstream }}
{{- end }}
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
{{- include "pubwarden.validateTls" . }}
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
    {{- if not (and .Values.tls.enabled .Values.tls.only) }}
    - name: pubwarden-resp
      containerPort: {{ .Values.ports.resp }}
      protocol: TCP
    {{- end }}
    {{- if .Values.tls.enabled }}
    - name: pubwarden-tls
      containerPort: {{ .Values.tls.port }}
      protocol: TCP
    {{- end }}
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
    {{- if .Values.tls.enabled }}
    # TLS Secrets as directories (no subPath): renewed certificates reach the
    # running container and pubwarden rotates them without a restart.
    - name: pubwarden-tls
      mountPath: {{ include "pubwarden.tlsDir" . }}
      readOnly: true
    {{- if include "pubwarden.tlsClientCaMounted" . }}
    - name: pubwarden-tls-client-ca
      mountPath: {{ include "pubwarden.tlsClientCaDir" . }}
      readOnly: true
    {{- end }}
    {{- end }}
    {{- if and .Values.upstreamTls.enabled .Values.upstreamTls.caSecretName }}
    - name: pubwarden-upstream-ca
      mountPath: {{ include "pubwarden.upstreamCaDir" . }}
      readOnly: true
    {{- end }}
    {{- if and .Values.upstreamTls.enabled .Values.upstreamTls.clientCertSecretName }}
    - name: pubwarden-upstream-client
      mountPath: {{ include "pubwarden.upstreamClientDir" . }}
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
{{- if .Values.tls.enabled }}
- name: pubwarden-tls
  secret:
    secretName: {{ .Values.tls.secretName }}
{{- if include "pubwarden.tlsClientCaMounted" . }}
- name: pubwarden-tls-client-ca
  secret:
    secretName: {{ .Values.tls.clientCaSecretName }}
{{- end }}
{{- end }}
{{- if and .Values.upstreamTls.enabled .Values.upstreamTls.caSecretName }}
- name: pubwarden-upstream-ca
  secret:
    secretName: {{ .Values.upstreamTls.caSecretName }}
{{- end }}
{{- if and .Values.upstreamTls.enabled .Values.upstreamTls.clientCertSecretName }}
- name: pubwarden-upstream-client
  secret:
    secretName: {{ .Values.upstreamTls.clientCertSecretName }}
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
