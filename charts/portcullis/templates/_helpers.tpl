{{/*
Name of the chart, or nameOverride.
*/}}
{{- define "portcullis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Base name of every object: fullnameOverride, or the release name joined with the chart name
unless the release name already contains it.
*/}}
{{- define "portcullis.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "portcullis.injectorName" -}}
{{- printf "%s-injector" (include "portcullis.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "portcullis.sidecarConfigName" -}}
{{- printf "%s-sidecar" (include "portcullis.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the policy bundle ConfigMap: policy.existingConfigMap, or the one the chart renders.
*/}}
{{- define "portcullis.policyConfigName" -}}
{{- default (printf "%s-policy" (include "portcullis.fullname" .) | trunc 63 | trimSuffix "-") .Values.policy.existingConfigMap }}
{{- end }}

{{- define "portcullis.tlsSecretName" -}}
{{- printf "%s-tls" (include "portcullis.injectorName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "portcullis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "portcullis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: portcullis
{{- end }}

{{- define "portcullis.injectorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "portcullis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end }}

{{- define "portcullis.injectorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "portcullis.sidecarImage" -}}
{{- $image := .Values.sidecar.image }}
{{- printf "%s:%s" (default .Values.image.repository $image.repository) (default (default .Chart.AppVersion .Values.image.tag) $image.tag) }}
{{- end }}

{{/*
Namespaces that receive the sidecar ConfigMaps.
*/}}
{{- define "portcullis.sidecarNamespaces" -}}
{{- $namespaces := .Values.sidecar.namespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $namespaces) }}
{{- end }}

{{/*
Kubernetes version given to the injector: the value, or what Helm reports for the cluster.
*/}}
{{- define "portcullis.kubernetesVersion" -}}
{{- default .Capabilities.KubeVersion.Version .Values.injector.kubernetesVersion }}
{{- end }}

{{/*
Whether the audit mode keeps files in the spool emptyDir: the event file, the spool, or the
state file of the kafka mode.
*/}}
{{- define "portcullis.usesSpool" -}}
{{- if has .Values.audit.mode (list "file" "spool" "kafka") }}true{{ end }}
{{- end }}

{{/*
Whether the sidecar mounts the checkpoint signing key: only the kafka and spool modes write
checkpoints.
*/}}
{{- define "portcullis.signsCheckpoints" -}}
{{- if and .Values.audit.checkpoint.signingKeySecret (has .Values.audit.mode (list "kafka" "spool")) }}true{{ end }}
{{- end }}

{{/*
The sidecar's config.yaml, with the keys of docs/configuration.md. The paths of the policy
bundle, the Vault token, the audit spool and the checkpoint signing key are where the
injector mounts them (see crates/portcullis-inject/src/sidecar.rs). What differs between the
pods that share this file comes from environment variables that the injector sets: the audit
instance id from POD_NAME, and the SPIFFE ID's namespace and service account from
POD_NAMESPACE and SERVICE_ACCOUNT.
*/}}
{{- define "portcullis.sidecarConfig" -}}
{{- $config := dict }}
{{- $_ := set $config "listen" (dict "address" (printf "127.0.0.1:%d" (int .Values.sidecar.grpcPort)) "max_message_bytes" (int64 .Values.sidecar.maxMessageBytes)) }}
{{- $_ := set $config "admin" (dict "address" (printf "0.0.0.0:%d" (int .Values.sidecar.adminPort))) }}
{{- $_ := set $config "policy" (dict "bundle" "/etc/portcullis-policy" "decision" .Values.policy.decision "reload_interval" .Values.policy.reloadInterval) }}
{{- $audit := dict "timeout" .Values.audit.timeout "mode" .Values.audit.mode }}
{{- if eq .Values.audit.mode "file" }}
{{- $_ := set $audit "path" "/var/lib/portcullis/spool/decisions.jsonl" }}
{{- else if has .Values.audit.mode (list "kafka" "spool") }}
{{- $kafka := dict "bootstrap_servers" .Values.kafka.brokers "topic" .Values.kafka.topic }}
{{- $_ := set $audit "kafka" (mergeOverwrite $kafka (deepCopy .Values.kafka.settings)) }}
{{- if eq .Values.audit.mode "spool" }}
{{- $_ := set $audit "spool" (dict "dir" "/var/lib/portcullis/spool") }}
{{- else }}
{{- /* Without a spool, the chain head survives a container restart in the emptyDir. */}}
{{- $_ := set $audit "state_file" "/var/lib/portcullis/spool/state.json" }}
{{- end }}
{{- if include "portcullis.signsCheckpoints" . }}
{{- $_ := set $audit "checkpoint" (dict "signing_key_file" (printf "/etc/portcullis-audit-key/%s" .Values.audit.checkpoint.signingKeyItem)) }}
{{- end }}
{{- end }}
{{- $_ := set $config "audit" $audit }}
{{- if .Values.jwt.providers }}
{{- $_ := set $config "jwt" (dict "providers" .Values.jwt.providers) }}
{{- end }}
{{- if .Values.vault.enabled }}
{{- $auth := dict "method" "kubernetes" "mount" .Values.vault.authMount "role" .Values.vault.role "service_account_token_file" "/var/run/secrets/portcullis/vault/token" }}
{{- $vault := dict "address" .Values.vault.address "auth" $auth }}
{{- $_ := set $config "vault" (mergeOverwrite $vault (deepCopy .Values.vault.settings)) }}
{{- $tls := dict "source" "vault" "common_name" (default .Values.istio.serviceEntry.host .Values.vault.commonName) "pki_mount" .Values.vault.pkiMount "pki_role" .Values.vault.pkiRole "ttl" .Values.vault.ttl }}
{{- with .Values.vault.spiffeTrustDomain }}
{{- $_ := set $tls "spiffe" (dict "trust_domain" .) }}
{{- end }}
{{- $_ := set $config "tls" $tls }}
{{- end }}
{{- $_ := set $config "log" (dict "level" .Values.sidecar.logLevel "format" .Values.sidecar.logFormat) }}
{{- $_ := set $config "shutdown" (dict "drain" .Values.sidecar.shutdown.drain "timeout" .Values.sidecar.shutdown.timeout) }}
{{- toYaml (mergeOverwrite $config (deepCopy .Values.sidecar.configOverrides)) }}
{{- end }}

{{/*
The injector's options file, read by `portcullis inject --config`.
*/}}
{{- define "portcullis.injectorConfig" -}}
{{- $sidecar := dict }}
{{- $_ := set $sidecar "image" (include "portcullis.sidecarImage" .) }}
{{- $_ := set $sidecar "image_pull_policy" (default .Values.image.pullPolicy .Values.sidecar.image.pullPolicy) }}
{{- $_ := set $sidecar "grpc_port" (int .Values.sidecar.grpcPort) }}
{{- $_ := set $sidecar "admin_port" (int .Values.sidecar.adminPort) }}
{{- $_ := set $sidecar "run_as_user" (int64 .Values.sidecar.runAsUser) }}
{{- $_ := set $sidecar "run_as_group" (int64 .Values.sidecar.runAsGroup) }}
{{- $_ := set $sidecar "resources" .Values.sidecar.resources }}
{{- $_ := set $sidecar "config_map" (include "portcullis.sidecarConfigName" .) }}
{{- $_ := set $sidecar "policy_config_map" (include "portcullis.policyConfigName" .) }}
{{- if .Values.vault.enabled }}
{{- $_ := set $sidecar "vault_token" (dict "audience" .Values.vault.tokenAudience "expiration_seconds" (int64 .Values.vault.tokenExpirationSeconds)) }}
{{- end }}
{{- if include "portcullis.usesSpool" . }}
{{- $spool := dict "size_limit" .Values.audit.spool.sizeLimit }}
{{- with .Values.audit.spool.medium }}
{{- $_ := set $spool "medium" . }}
{{- end }}
{{- $_ := set $sidecar "audit_spool" $spool }}
{{- end }}
{{- if include "portcullis.signsCheckpoints" . }}
{{- $_ := set $sidecar "audit_signing_key_secret" .Values.audit.checkpoint.signingKeySecret }}
{{- end }}
{{- $injection := dict "kubernetes_version" (include "portcullis.kubernetesVersion" .) "failure_policy" .Values.injector.failurePolicy "sidecar" $sidecar }}
{{- $listen := dict "address" (printf "0.0.0.0:%d" (int .Values.injector.port)) }}
{{- $tls := dict "cert_file" "/etc/portcullis-inject/tls/tls.crt" "key_file" "/etc/portcullis-inject/tls/tls.key" }}
{{- toYaml (dict "listen" $listen "tls" $tls "injection" $injection) }}
{{- end }}

{{/*
Checks between values that the schema cannot express with a clear message.
*/}}
{{- define "portcullis.validate" -}}
{{- if eq (int .Values.sidecar.grpcPort) (int .Values.sidecar.adminPort) }}
{{- fail (printf "sidecar.grpcPort and sidecar.adminPort must differ; both are %d" (int .Values.sidecar.grpcPort)) }}
{{- end }}
{{- if and .Values.policy.existingConfigMap .Values.policy.files }}
{{- fail "set only one policy bundle source; found policy.existingConfigMap and policy.files" }}
{{- end }}
{{- if and .Values.audit.checkpoint.signingKeySecret (not (has .Values.audit.mode (list "kafka" "spool"))) }}
{{- fail (printf "audit.checkpoint.signingKeySecret is only used by the kafka and spool audit modes, but audit.mode is %s" .Values.audit.mode) }}
{{- end }}
{{- end }}
