{{/*
Names and labels. The `app.kubernetes.io/name: cortex` and `app.kubernetes.io/component` labels are
fixed: the operator finds neuron pods by them (docs/kubernetes.md).
*/}}

{{- define "cortex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains "cortex" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-cortex" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "cortex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: cortex
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component's pods: (dict "root" $ "component" "neuron"). */}}
{{- define "cortex.selectorLabels" -}}
app.kubernetes.io/name: cortex
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component's objects and pods. */}}
{{- define "cortex.componentLabels" -}}
{{ include "cortex.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The label selector string the operator finds neuron pods with. */}}
{{- define "cortex.neuronSelector" -}}
app.kubernetes.io/name=cortex,app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=neuron
{{- end -}}

{{/* An image reference: (dict "root" $ "image" .Values.x.image "suffix" ""). */}}
{{- define "cortex.image" -}}
{{- $tag := .image.tag | default (printf "%s%s" .root.Chart.AppVersion (.suffix | default "")) -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{- define "cortex.adminTokenSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin-token" (include "cortex.fullname" .)) -}}
{{- end -}}

{{- define "cortex.apiKeysSecret" -}}
{{- .Values.gateway.auth.existingSecret | default (printf "%s-api-keys" (include "cortex.fullname" .)) -}}
{{- end -}}

{{/* Pod security for every cortex container: non-root, no privilege escalation, no capabilities. */}}
{{- define "cortex.containerSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
A TOML value from a values scalar or list of scalars: JSON's strings, numbers, booleans and arrays
of them are valid TOML too.
*/}}
{{- define "cortex.tomlValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{/* host:port to listen on, for the chart's listenHost; an IPv6 host goes in brackets. */}}
{{- define "cortex.listen" -}}
{{- $host := .root.Values.listenHost -}}
{{- if contains ":" $host }}[{{ $host }}]:{{ .port }}{{ else }}{{ $host }}:{{ .port }}{{ end -}}
{{- end }}

{{/* A Prometheus duration (a ServiceMonitor interval): a number, or only digits, is seconds. */}}
{{- define "cortex.scrapeDuration" -}}
{{- $text := toString . -}}
{{- if regexMatch "^[0-9]+$" $text }}{{ printf "%ss" $text | quote }}{{ else }}{{ $text | quote }}{{ end -}}
{{- end }}
