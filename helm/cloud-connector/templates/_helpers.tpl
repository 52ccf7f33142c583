{{/* Names, labels and the pieces both Deployments share. */}}

{{- define "cc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cc.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Resource names leave room for the longest suffix ("-operator-secrets"). */}}
{{- define "cc.operator.fullname" -}}
{{- printf "%s-operator" (include "cc.fullname" . | trunc 45 | trimSuffix "-") -}}
{{- end -}}

{{- define "cc.proxy.fullname" -}}
{{- printf "%s-proxy" (include "cc.fullname" . | trunc 45 | trimSuffix "-") -}}
{{- end -}}

{{- define "cc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "cc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cloud-connector
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "cc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cc.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cc.componentLabels" -}}
{{ include "cc.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cc.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "cc.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "cc.proxy.serviceAccountName" -}}
{{- if .Values.proxy.serviceAccount.create -}}
{{- default (include "cc.proxy.fullname" .) .Values.proxy.serviceAccount.name -}}
{{- else -}}
{{- required "proxy.serviceAccount.name is required when proxy.serviceAccount.create is false" .Values.proxy.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image reference; call with (dict "ctx" $ "image" .Values.operator.image). */}}
{{- define "cc.image" -}}
{{- $repo := .image.repository -}}
{{- with .ctx.Values.global.imageRegistry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo -}}
{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "cc.proxy.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "cc.proxy.fullname" .)) .Values.proxy.tls.secretName -}}
{{- end -}}

{{- define "cc.vault.caConfigMapName" -}}
{{- printf "%s-vault-ca" (include "cc.fullname" . | trunc 50 | trimSuffix "-") -}}
{{- end -}}

{{- define "cc.vault.hasCA" -}}
{{- $ca := .Values.vault.ca -}}
{{- if or $ca.secretName $ca.configMapName $ca.pem -}}true{{- end -}}
{{- end -}}

{{/* Namespaces where the operator reads Secrets (empty list means cluster-wide is configured). */}}
{{- define "cc.operator.secretNamespaces" -}}
{{- $ns := .Values.operator.secretAccess.namespaces -}}
{{- if not $ns -}}
{{- $ns = .Values.operator.watchNamespaces -}}
{{- end -}}
{{- if not $ns -}}
{{- $ns = list .Release.Namespace -}}
{{- end -}}
{{- toJson (uniq $ns) -}}
{{- end -}}

{{/* Pod-level security context: the same hardening for every pod of the chart. */}}
{{- define "cc.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podUser.runAsUser }}
runAsGroup: {{ .Values.podUser.runAsGroup }}
fsGroup: {{ .Values.podUser.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cc.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Vault settings as environment variables; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "cc.vaultEnv" -}}
{{- $v := .ctx.Values.vault -}}
- name: VAULT_ADDR
  value: {{ required "vault.address is required (e.g. https://vault.vault.svc:8200)" $v.address | quote }}
{{- if include "cc.vault.hasCA" .ctx }}
- name: VAULT_CACERT
  value: /etc/cloud-connector/vault-ca/ca.crt
{{- end }}
- name: CLOUDCONNECTOR_VAULT_AUTH
  value: {{ $v.authMethod | quote }}
{{- with $v.authMount }}
- name: CLOUDCONNECTOR_VAULT_AUTH_MOUNT
  value: {{ . | quote }}
{{- end }}
- name: CLOUDCONNECTOR_VAULT_ROLE
  value: {{ index $v.roles .component | quote }}
{{- if and $v.jwtAudience (ne $v.authMethod "token") }}
- name: CLOUDCONNECTOR_VAULT_JWT_FILE
  value: /var/run/secrets/vault/token
{{- end }}
- name: CLOUDCONNECTOR_VAULT_KV_MOUNT
  value: {{ $v.kvMount | quote }}
- name: CLOUDCONNECTOR_VAULT_PREFIX
  value: {{ $v.prefix | quote }}
- name: CLOUDCONNECTOR_VAULT_TRANSIT_MOUNT
  value: {{ $v.transitMount | quote }}
{{- if eq $v.authMethod "token" }}
{{- $tok := index $v.tokenSecret .component }}
- name: VAULT_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "vault.tokenSecret.%s.name is required when vault.authMethod is token" .component) $tok.name | quote }}
      key: {{ $tok.key | quote }}
{{- end }}
{{- end -}}

{{- define "cc.vaultCAVolume" -}}
{{- $ca := .Values.vault.ca -}}
- name: vault-ca
{{- if $ca.secretName }}
  secret:
    secretName: {{ $ca.secretName | quote }}
    items:
      - {key: {{ $ca.key | quote }}, path: ca.crt}
{{- else if $ca.configMapName }}
  configMap:
    name: {{ $ca.configMapName | quote }}
    items:
      - {key: {{ $ca.key | quote }}, path: ca.crt}
{{- else }}
  configMap:
    name: {{ include "cc.vault.caConfigMapName" . }}
    items:
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end -}}

{{/* Egress rules both components need: DNS, the API server and Vault. */}}
{{- define "cc.commonEgress" -}}
{{- $np := .Values.networkPolicy -}}
- to:
    - namespaceSelector:{{ toYaml $np.dns.namespaceSelector | nindent 8 }}
      podSelector:{{ toYaml $np.dns.podSelector | nindent 8 }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
- ports:
    {{- range $np.apiServer.ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
  {{- with $np.apiServer.cidrs }}
  to:
    {{- range . }}
    - ipBlock: {cidr: {{ . | quote }}}
    {{- end }}
  {{- end }}
- ports:
    - {protocol: TCP, port: {{ $np.vault.port }}}
  {{- if or $np.vault.cidrs $np.vault.peers }}
  to:
    {{- range $np.vault.cidrs }}
    - ipBlock: {cidr: {{ . | quote }}}
    {{- end }}
    {{- with $np.vault.peers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
{{- end -}}

{{/* Egress to the clouds on the given ports; call with (dict "ctx" $ "ports" list). */}}
{{- define "cc.cloudEgress" -}}
{{- $c := .ctx.Values.networkPolicy.clouds -}}
- to:
    {{- range $c.cidrs }}
    - ipBlock:
        cidr: {{ . | quote }}
        {{- if and $c.except (eq . "0.0.0.0/0") }}
        except: {{ toJson $c.except }}
        {{- end }}
    {{- end }}
  ports:
    {{- range .ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
{{- end -}}

{{/* Volume and mount for an audience-bound token used only to log in to Vault. */}}
{{- define "cc.vaultTokenWanted" -}}
{{- if and .Values.vault.jwtAudience (ne .Values.vault.authMethod "token") -}}true{{- end -}}
{{- end -}}

{{- define "cc.vaultTokenVolume" -}}
- name: vault-token
  projected:
    sources:
      - serviceAccountToken:
          audience: {{ .Values.vault.jwtAudience | quote }}
          expirationSeconds: 3600
          path: token
{{- end -}}
