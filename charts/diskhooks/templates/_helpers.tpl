{{/*
Helpers of the diskhooks chart. Names are namespaced "diskhooks.<component>.<what>".
*/}}

{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "diskhooks.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: the release name, plus the chart name unless it contains it. */}}
{{- define "diskhooks.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "diskhooks.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "diskhooks.labels" -}}
helm.sh/chart: {{ include "diskhooks.chart" . }}
app.kubernetes.io/name: {{ include "diskhooks.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: diskhooks
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- webhook component */}}
{{- define "diskhooks.webhook.name" -}}
{{- printf "%s-webhook" (include "diskhooks.fullname" .) -}}
{{- end -}}

{{- define "diskhooks.webhook.selectorLabels" -}}
app.kubernetes.io/name: {{ include "diskhooks.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{- define "diskhooks.webhook.labels" -}}
{{ include "diskhooks.labels" . }}
app.kubernetes.io/component: webhook
{{- end -}}

{{- define "diskhooks.webhook.image" -}}
{{- $img := .Values.webhook.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* DNS names the serving certificate carries: the webhook Service's in-cluster names. */}}
{{- define "diskhooks.webhook.dnsNames" -}}
{{- $svc := include "diskhooks.webhook.name" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson -}}
{{- end -}}

{{/* ---------------------------------------------------------------- node agent component */}}
{{- define "diskhooks.node.name" -}}
{{- printf "%s-node" (include "diskhooks.fullname" .) -}}
{{- end -}}

{{- define "diskhooks.node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "diskhooks.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{- define "diskhooks.node.labels" -}}
{{ include "diskhooks.labels" . }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{- define "diskhooks.node.image" -}}
{{- $img := .Values.nodeAgent.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* The node agent's identity in the policy: "<release namespace>/<its ServiceAccount>". */}}
{{- define "diskhooks.node.serviceAccount" -}}
{{- printf "%s/%s" .Release.Namespace (include "diskhooks.node.name" .) -}}
{{- end -}}

{{/* The Secret with the agents' migration TLS files (ca.crt, tls.crt, tls.key). */}}
{{- define "diskhooks.node.migrationSecretName" -}}
{{- .Values.nodeAgent.migration.existingSecret | default (printf "%s-migration-tls" (include "diskhooks.node.name" .)) -}}
{{- end -}}

{{/* ---------------------------------------------------------------- TLS component */}}
{{- define "diskhooks.tls.secretName" -}}
{{- printf "%s-webhook-tls" (include "diskhooks.fullname" .) -}}
{{- end -}}

{{- define "diskhooks.tls.certificateName" -}}
{{- printf "%s-webhook" (include "diskhooks.fullname" .) -}}
{{- end -}}

{{- define "diskhooks.tls.caName" -}}
{{- printf "%s-ca" (include "diskhooks.fullname" .) -}}
{{- end -}}

{{- define "diskhooks.tls.selfSignedIssuerName" -}}
{{- printf "%s-selfsigned" (include "diskhooks.fullname" .) -}}
{{- end -}}

{{/*
The serving certificate of the default (no cert-manager) mode, as a dict of base64 strings:
ca.crt, tls.crt, tls.key, caBundle (ca.crt plus the previous CA after a rotation), previous-ca.crt,
generation. Made ONCE per release: an existing Secret (found with `lookup`) is reused unless
tls.generation was bumped. The result is cached in .Values so that the Secret and the
MutatingWebhookConfiguration, rendered from different files, get the same CA.
`helm template` and client-side dry runs cannot lookup: they render a fresh CA every time.
*/}}
{{- define "diskhooks.tls.material" -}}
{{- if not (hasKey .Values "_diskhooksTLS") -}}
{{- $name := include "diskhooks.tls.secretName" . -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $name -}}
{{- $data := dict -}}
{{- $storedGen := 0 -}}
{{- if $existing -}}
{{- $annotations := $existing.metadata.annotations | default dict -}}
{{- if hasKey $annotations "cert-manager.io/certificate-name" -}}
{{- fail (printf "certManager.enabled=false: the Secret %s/%s was made by cert-manager (certManager.enabled=true before) and Helm cannot take it over. Delete it, then upgrade at once: kubectl -n %s delete secret %s (see the chart README, \"Leaving cert-manager mode\")" $.Release.Namespace $name $.Release.Namespace $name) -}}
{{- end -}}
{{- $data = $existing.data | default dict -}}
{{- $storedGen = int (index $annotations "diskhooks.io/tls-generation" | default "1") -}}
{{- end -}}
{{- $wanted := int .Values.tls.generation -}}
{{- $complete := and (hasKey $data "ca.crt") (hasKey $data "tls.crt") (hasKey $data "tls.key") -}}
{{- $m := dict -}}
{{- if and $complete (le $wanted $storedGen) -}}
{{- $_ := set $m "ca.crt" (index $data "ca.crt") -}}
{{- $_ := set $m "tls.crt" (index $data "tls.crt") -}}
{{- $_ := set $m "tls.key" (index $data "tls.key") -}}
{{- $_ := set $m "previous-ca.crt" (index $data "previous-ca.crt" | default "") -}}
{{- $_ := set $m "generation" $storedGen -}}
{{- else -}}
{{- $days := int .Values.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "diskhooks.fullname" .)) $days -}}
{{- $dnsNames := include "diskhooks.webhook.dnsNames" . | fromJsonArray -}}
{{- $cert := genSignedCert (index $dnsNames 2) nil $dnsNames $days $ca -}}
{{- $_ := set $m "ca.crt" ($ca.Cert | b64enc) -}}
{{- $_ := set $m "tls.crt" ($cert.Cert | b64enc) -}}
{{- $_ := set $m "tls.key" ($cert.Key | b64enc) -}}
{{- $_ := set $m "previous-ca.crt" (ternary (index $data "ca.crt" | default "") "" $complete) -}}
{{- $_ := set $m "generation" (max $wanted $storedGen 1) -}}
{{- end -}}
{{- $bundle := index $m "ca.crt" | b64dec -}}
{{- with index $m "previous-ca.crt" -}}
{{- $bundle = printf "%s\n%s" (trimSuffix "\n" $bundle) (b64dec .) -}}
{{- end -}}
{{- $_ := set $m "caBundle" ($bundle | b64enc) -}}
{{- $_ := set .Values "_diskhooksTLS" $m -}}
{{- end -}}
{{- toJson .Values._diskhooksTLS -}}
{{- end -}}

{{/* ---------------------------------------------------------------- plan-key component */}}
{{- define "diskhooks.planKeys.secretName" -}}
{{- if .Values.planKeys.existingSecret -}}
{{- .Values.planKeys.existingSecret -}}
{{- else -}}
{{- printf "%s-plan-keys" (include "diskhooks.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The webhooks' namespaceSelector: the opt-in label, never kube-system or the release namespace. */}}
{{- define "diskhooks.admission.namespaceSelector" -}}
{{- $sel := .Values.admission.namespaceSelector -}}
{{- $excluded := concat (list "kube-system" .Release.Namespace) .Values.admission.excludeNamespaces | uniq -}}
{{- $selector := dict "matchExpressions" (list (dict "key" "kubernetes.io/metadata.name" "operator" "NotIn" "values" $excluded)) -}}
{{- if $sel.optIn -}}
{{- $_ := set $selector "matchLabels" (dict $sel.label (toString $sel.value)) -}}
{{- end -}}
{{- toYaml $selector -}}
{{- end -}}

{{/* What the three webhooks share (rules, paths and selectors differ). */}}
{{- define "diskhooks.admission.common" -}}
admissionReviewVersions: ["v1"]
sideEffects: None
matchPolicy: Equivalent
reinvocationPolicy: IfNeeded
timeoutSeconds: {{ .timeout }}
namespaceSelector:
  {{- .nsSelector | nindent 2 }}
clientConfig:
  service:
    name: {{ .svc }}
    namespace: {{ .ns }}
    path: {{ .path }}
    port: 443
  {{- with .caBundle }}
  caBundle: {{ . }}
  {{- end }}
{{- end -}}
