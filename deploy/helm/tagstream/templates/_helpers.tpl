{{- define "tagstream.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tagstream.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tagstream.labels" -}}
app.kubernetes.io/name: {{ include "tagstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tagstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tagstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tagstream.secretName" -}}
{{- default (include "tagstream.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/* SIGTERM must be able to finish a batch whose LLM calls time out on every attempt. */}}
{{- define "tagstream.gracePeriod" -}}
{{- $llm := mul (int (ceil .Values.config.llmTimeoutS)) (int .Values.config.llmAttempts) -}}
{{- max (int .Values.terminationGracePeriodSeconds) (add $llm 60) -}}
{{- end -}}
