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

{{- define "tagstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tagstream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* SIGTERM: the service's shutdown budget, then acks, the commit and leaving the group. */}}
{{- define "tagstream.gracePeriod" -}}
{{- max (int .Values.terminationGracePeriodSeconds) (add (int (ceil .Values.config.shutdownTimeoutS)) 60) -}}
{{- end -}}

{{/* KEDA's names for librdkafka's SASL mechanisms. */}}
{{- define "tagstream.kedaSasl" -}}
{{- $m := upper .Values.config.saslMechanism -}}
{{- if eq $m "PLAIN" -}}plaintext
{{- else if eq $m "SCRAM-SHA-256" -}}scram_sha256
{{- else if eq $m "SCRAM-SHA-512" -}}scram_sha512
{{- else -}}{{ fail (printf "keda: the chart's TriggerAuthentication logs in with a username and password (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), not %q: give keda.auth.existingTriggerAuthentication (OAUTHBEARER needs a token endpoint, GSSAPI a keytab)" .Values.config.saslMechanism) }}
{{- end -}}
{{- end -}}

{{/* Whether the KEDA scaler needs a TriggerAuthentication: SASL credentials or a CA. */}}
{{- define "tagstream.kedaNeedsAuth" -}}
{{- if or (hasPrefix "SASL" .Values.config.securityProtocol) .Values.keda.auth.caSecret.name -}}true{{- end -}}
{{- end -}}
