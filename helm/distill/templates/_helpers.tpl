{{/*
Names and labels shared by every object of the chart.
*/}}

{{- define "distill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full object name. Pod hostnames are "<fullname>-workers-<slice>-<worker>" and must
fit in a 63-character DNS label, so the name is limited to 40 characters and a
longer one fails instead of being cut silently.
*/}}
{{- define "distill.fullname" -}}
{{- $name := "" }}
{{- if .Values.fullnameOverride }}
{{- $name = .Values.fullnameOverride }}
{{- else if contains (include "distill.name" .) .Release.Name }}
{{- $name = .Release.Name }}
{{- else }}
{{- $name = printf "%s-%s" .Release.Name (include "distill.name" .) }}
{{- end }}
{{- if gt (len $name) 40 }}
{{- fail (printf "the object name %q is %d characters long; pod hostnames need at most 40: use a shorter release name or set fullnameOverride" $name (len $name)) }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "distill.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Experiment name: config.experiment.name, defaulting to the release name.
*/}}
{{- define "distill.experiment" -}}
{{- $experiment := .Values.config.experiment | default dict }}
{{- $experiment.name | default .Release.Name }}
{{- end }}

{{- define "distill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "distill.labels" -}}
helm.sh/chart: {{ include "distill.chart" . }}
{{ include "distill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distill
distill/experiment: {{ include "distill.experiment" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "distill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "distill.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "distill.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Name of the replicated job; part of every pod hostname.
*/}}
{{- define "distill.replicatedJobName" -}}
workers
{{- end }}
