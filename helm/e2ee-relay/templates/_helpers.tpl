{{/* Names and labels. */}}
{{- define "e2ee-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "e2ee-relay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "e2ee-relay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "e2ee-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include "e2ee-relay.selector" (list . "relay") */}}
{{- define "e2ee-relay.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "e2ee-relay.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "e2ee-relay.componentLabels" -}}
{{ include "e2ee-relay.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "e2ee-relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "e2ee-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "e2ee-relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "e2ee-relay.keysService" -}}
{{- printf "%s-keys" (include "e2ee-relay.fullname" .) }}
{{- end }}

{{- define "e2ee-relay.relayService" -}}
{{- printf "%s-relay" (include "e2ee-relay.fullname" .) }}
{{- end }}

{{/* The DNS names of a Service, short to fully qualified: include "e2ee-relay.serviceNames" (list . NAME) */}}
{{- define "e2ee-relay.serviceNames" -}}
{{- $ := index . 0 -}}
{{- $name := index . 1 -}}
{{- $ns := $.Release.Namespace -}}
{{- list $name (printf "%s.%s" $name $ns) (printf "%s.%s.svc" $name $ns) (printf "%s.%s.svc.%s" $name $ns $.Values.clusterDomain) | toJson }}
{{- end }}

{{- define "e2ee-relay.caSecret" -}}
{{- if eq .Values.tls.mode "existingCA" }}
{{- required "tls.existingCASecret: tls.mode existingCA needs a Secret with the CA's tls.crt and tls.key" .Values.tls.existingCASecret }}
{{- else if eq .Values.tls.mode "selfSigned" }}
{{- printf "%s-ca" (include "e2ee-relay.fullname" .) }}
{{- else }}
{{- fail (printf "tls.mode: %q is unknown (known: selfSigned, existingCA). Relay nodes read the key directory with a bearer key, which it accepts only over TLS, so the chart has no plaintext mode" .Values.tls.mode) }}
{{- end }}
{{- end }}

{{- define "e2ee-relay.relayNodeKeySecret" -}}
{{- default (printf "%s-relay-node-key" (include "e2ee-relay.fullname" .)) .Values.relayNodeKey.existingSecret }}
{{- end }}

{{- define "e2ee-relay.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "e2ee-relay.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "e2ee-relay.cassandraSecret" -}}
{{- default (printf "%s-cassandra" (include "e2ee-relay.fullname" .)) .Values.cassandra.existingSecret }}
{{- end }}

{{- define "e2ee-relay.cassandraHosts" -}}
{{- if .Values.dev.cassandra.enabled }}
{{- list (printf "%s-cassandra" (include "e2ee-relay.fullname" .)) | toJson }}
{{- else }}
{{- required "cassandra.contactPoints: name the Cassandra cluster's seed hosts (or set dev.cassandra.enabled)" .Values.cassandra.contactPoints | toJson }}
{{- end }}
{{- end }}

{{- define "e2ee-relay.redisUrl" -}}
{{- if .Values.dev.redis.enabled }}
{{- printf "redis://%s-redis:6379/0" (include "e2ee-relay.fullname" .) }}
{{- else }}
{{- required "redis.url: the Redis for presence, redis://HOST:6379/0 (or set dev.redis.enabled)" .Values.redis.url }}
{{- end }}
{{- end }}

{{/*
A value of a Secret the chart made before (kept across upgrades), else a new random one:
include "e2ee-relay.keptSecret" (list . SECRET KEY)
*/}}
{{- define "e2ee-relay.keptSecret" -}}
{{- $ := index . 0 -}}
{{- $old := lookup "v1" "Secret" $.Release.Namespace (index . 1) -}}
{{- $key := index . 2 -}}
{{- if and $old $old.data (hasKey $old.data $key) }}
{{- index $old.data $key }}
{{- else }}
{{- randAlphaNum 48 | b64enc }}
{{- end }}
{{- end }}

{{/*
TOML from a map: include "e2ee-relay.toml" (dict "table" MAP "path" "").
Numbers arrive from YAML as floats: integral ones are written as integers (relayd's
loader takes an integer where it wants a float, never the other way round).
*/}}
{{- define "e2ee-relay.toml" -}}
{{- $table := .table -}}
{{- $path := .path -}}
{{- range $key := keys $table | sortAlpha }}
{{- $value := index $table $key }}
{{- $isTable := kindIs "map" $value }}
{{- $isTables := and (kindIs "slice" $value) (gt (len $value) 0) (kindIs "map" (first $value)) }}
{{- if not (or $isTable $isTables (kindIs "invalid" $value)) }}
{{ $key }} = {{ include "e2ee-relay.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := index $table $key }}
{{- $sub := ternary $key (printf "%s.%s" $path $key) (eq $path "") }}
{{- if kindIs "map" $value }}

[{{ $sub }}]
{{- include "e2ee-relay.toml" (dict "table" $value "path" $sub) }}
{{- else if and (kindIs "slice" $value) (gt (len $value) 0) (kindIs "map" (first $value)) }}
{{- range $item := $value }}

[[{{ $sub }}]]
{{- include "e2ee-relay.toml" (dict "table" $item "path" $sub) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "e2ee-relay.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if kindIs "float64" . }}{{ if eq . (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) }}{{ . }}
{{- else if kindIs "slice" . }}[{{ range $i, $item := . }}{{ if $i }}, {{ end }}{{ include "e2ee-relay.tomlValue" $item }}{{ end }}]
{{- else }}{{ fail (printf "cannot write %v (%s) as a TOML value" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/* Configuration every relayd of the release shares (YAML, before TOML). */}}
{{- define "e2ee-relay.commonConfig" -}}
storage:
  backend: cassandra
  data_dir: /var/lib/relay
cassandra:
  contact_points: {{ include "e2ee-relay.cassandraHosts" . }}
  port: {{ .Values.cassandra.port }}
  keyspace: {{ .Values.cassandra.keyspace | quote }}
  local_dc: {{ .Values.cassandra.localDc | quote }}
  consistency: {{ .Values.cassandra.consistency | quote }}
  replication_factor: {{ ternary 1 .Values.cassandra.replicationFactor .Values.dev.cassandra.enabled }}
  request_timeout_seconds: {{ .Values.cassandra.requestTimeoutSeconds }}
  {{- if and .Values.cassandra.username (not .Values.dev.cassandra.enabled) }}
  username: {{ .Values.cassandra.username | quote }}
  password_file: /etc/relay/secrets/cassandra/password
  {{- end }}
  {{- if and .Values.cassandra.tls.enabled (not .Values.dev.cassandra.enabled) }}
  ssl_ca_file: /etc/relay/cassandra-tls/{{ .Values.cassandra.tls.caKey }}
  ssl_check_hostname: {{ .Values.cassandra.tls.checkHostname }}
  {{- if .Values.cassandra.tls.clientCertSecret }}
  ssl_cert_file: /etc/relay/cassandra-client/tls.crt
  ssl_key_file: /etc/relay/cassandra-client/tls.key
  {{- end }}
  {{- end }}
presence:
  backend: redis
  redis_url: {{ include "e2ee-relay.redisUrl" . | quote }}
  key_prefix: {{ .Values.redis.keyPrefix | quote }}
  {{- if and (hasPrefix "rediss://" (include "e2ee-relay.redisUrl" .)) (not .Values.dev.redis.enabled) }}
  {{- if .Values.redis.tls.caSecret }}
  redis_ca_file: /etc/relay/redis-tls/{{ .Values.redis.tls.caKey }}
  {{- end }}
  {{- if .Values.redis.tls.clientCertSecret }}
  redis_cert_file: /etc/relay/redis-client/tls.crt
  redis_key_file: /etc/relay/redis-client/tls.key
  {{- end }}
  {{- end }}
keyserver:
  target: {{ printf "%s.%s.svc.%s:%v" (include "e2ee-relay.keysService" .) .Release.Namespace .Values.clusterDomain .Values.keyserver.ports.grpc | quote }}
  relay_key_file: /etc/relay/secrets/relay-node-key/{{ .Values.relayNodeKey.existingSecretKey }}
{{- with .Values.apiKeys.keys }}
api_keys:
{{- range . }}
  - tenant: {{ required "apiKeys.keys[].tenant" .tenant | quote }}
    name: {{ required "apiKeys.keys[].name" .name | quote }}
    key_file: {{ printf "/etc/relay/secrets/api-keys/%s" (default (printf "%s.%s" .tenant .name) .secretKey) | quote }}
{{- end }}
{{- end }}
tls:
  cert_file: /run/relay/tls/tls.crt
  key_file: /run/relay/tls/tls.key
  client_ca_file: /run/relay/tls/ca.crt
  ca_file: /run/relay/tls/ca.crt
metrics:
  listen: {{ ternary (printf "0.0.0.0:%v" .Values.relay.ports.metrics) "off" .Values.metrics.enabled | quote }}
  keyserver_listen: {{ ternary (printf "0.0.0.0:%v" .Values.keyserver.ports.metrics) "off" .Values.metrics.enabled | quote }}
{{- end }}

{{/* relay.toml of the relay nodes (node.id and node.link_advertise come from flags). */}}
{{- define "e2ee-relay.relayConfig" -}}
{{- $config := fromYaml (include "e2ee-relay.commonConfig" .) -}}
{{- $node := dict "listen" (printf "0.0.0.0:%v" .Values.relay.ports.device) "link_listen" (printf "0.0.0.0:%v" .Values.relay.ports.link) "drain_delay_seconds" .Values.relay.drain.drainDelaySeconds "grace_seconds" .Values.relay.drain.graceSeconds -}}
{{- $_ := set $config "node" $node -}}
{{- $config = mergeOverwrite $config (deepCopy .Values.config) (deepCopy .Values.relay.config) -}}
{{- include "e2ee-relay.toml" (dict "table" $config "path" "") }}
{{- end }}

{{/* keyserver.toml of the key directory. */}}
{{- define "e2ee-relay.keyserverConfig" -}}
{{- $config := fromYaml (include "e2ee-relay.commonConfig" .) -}}
{{- $keys := get $config "keyserver" -}}
{{- $_ := set $keys "listen" (printf "0.0.0.0:%v" .Values.keyserver.ports.grpc) -}}
{{- $_ = set $keys "default_registration" .Values.keyserver.registration.default -}}
{{- $tenants := list -}}
{{- range .Values.keyserver.registration.tenants -}}
{{- $tenant := dict "name" (required "keyserver.registration.tenants[].name" .name) "registration" (default "open" .registration) -}}
{{- if eq (default "open" .registration) "token" -}}
{{- $_ = required (printf "keyserver.registration.tenants[%s].tokenPublicKey: a token tenant needs its signing key's public half (relayd gen-tenant-key)" .name) .tokenPublicKey -}}
{{- $_ = set $tenant "token_public_key_file" (printf "/etc/relay/tenants/%s.pub" .name) -}}
{{- end -}}
{{- $tenants = append $tenants $tenant -}}
{{- end -}}
{{- if $tenants }}{{ $_ = set $keys "tenants" $tenants }}{{ end -}}
{{- $_ = set $config "node" (dict "drain_delay_seconds" .Values.keyserver.drain.drainDelaySeconds "grace_seconds" .Values.keyserver.drain.graceSeconds) -}}
{{- $config = mergeOverwrite $config (deepCopy .Values.config) (deepCopy .Values.keyserver.config) -}}
{{- include "e2ee-relay.toml" (dict "table" $config "path" "") }}
{{- end }}

{{/* migrate.toml of the migrations Job: Cassandra only. */}}
{{- define "e2ee-relay.migrateConfig" -}}
{{- $common := fromYaml (include "e2ee-relay.commonConfig" .) -}}
{{- $config := dict "storage" (get $common "storage") "cassandra" (get $common "cassandra") -}}
{{- /* Schema changes wait for agreement between the nodes: longer than a query. */ -}}
{{- $_ := set (get $config "cassandra") "request_timeout_seconds" .Values.migrations.requestTimeoutSeconds -}}
{{- $extra := deepCopy .Values.config -}}
{{- if hasKey $extra "cassandra" }}{{ $config = mergeOverwrite $config (dict "cassandra" (get $extra "cassandra")) }}{{ end -}}
{{- include "e2ee-relay.toml" (dict "table" $config "path" "") }}
{{- end }}

{{/* Volumes and mounts of the Cassandra and Redis client files every relayd needs. */}}
{{- define "e2ee-relay.storeVolumes" -}}
{{- if and .Values.cassandra.username (not .Values.dev.cassandra.enabled) }}
- name: cassandra-password
  secret:
    secretName: {{ include "e2ee-relay.cassandraSecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.cassandra.existingSecretKey }}
        path: password
{{- end }}
{{- if and .Values.cassandra.tls.enabled (not .Values.dev.cassandra.enabled) }}
- name: cassandra-tls
  secret:
    secretName: {{ required "cassandra.tls.caSecret: the Secret with the CA that verifies Cassandra" .Values.cassandra.tls.caSecret }}
    defaultMode: 0440
{{- if .Values.cassandra.tls.clientCertSecret }}
- name: cassandra-client
  secret:
    secretName: {{ .Values.cassandra.tls.clientCertSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- if and (hasPrefix "rediss://" (include "e2ee-relay.redisUrl" .)) (not .Values.dev.redis.enabled) }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.tls.caSecret }}
    defaultMode: 0440
{{- end }}
{{- if .Values.redis.tls.clientCertSecret }}
- name: redis-client
  secret:
    secretName: {{ .Values.redis.tls.clientCertSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end }}

{{- define "e2ee-relay.storeMounts" -}}
{{- if and .Values.cassandra.username (not .Values.dev.cassandra.enabled) }}
- name: cassandra-password
  mountPath: /etc/relay/secrets/cassandra
  readOnly: true
{{- end }}
{{- if and .Values.cassandra.tls.enabled (not .Values.dev.cassandra.enabled) }}
- name: cassandra-tls
  mountPath: /etc/relay/cassandra-tls
  readOnly: true
{{- if .Values.cassandra.tls.clientCertSecret }}
- name: cassandra-client
  mountPath: /etc/relay/cassandra-client
  readOnly: true
{{- end }}
{{- end }}
{{- if and (hasPrefix "rediss://" (include "e2ee-relay.redisUrl" .)) (not .Values.dev.redis.enabled) }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-tls
  mountPath: /etc/relay/redis-tls
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.clientCertSecret }}
- name: redis-client
  mountPath: /etc/relay/redis-client
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* Secrets of relay nodes and the key directory alike: the relay nodes' key, API keys. */}}
{{- define "e2ee-relay.secretVolumes" -}}
- name: relay-node-key
  secret:
    secretName: {{ include "e2ee-relay.relayNodeKeySecret" . }}
    defaultMode: 0440
{{- if .Values.apiKeys.keys }}
- name: api-keys
  secret:
    secretName: {{ include "e2ee-relay.apiKeysSecret" . }}
    defaultMode: 0440
{{- end }}
- name: ca
  secret:
    secretName: {{ include "e2ee-relay.caSecret" . }}
    defaultMode: 0440
- name: tls
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: data
  emptyDir:
    sizeLimit: 64Mi
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{- define "e2ee-relay.secretMounts" -}}
- name: relay-node-key
  mountPath: /etc/relay/secrets/relay-node-key
  readOnly: true
{{- if .Values.apiKeys.keys }}
- name: api-keys
  mountPath: /etc/relay/secrets/api-keys
  readOnly: true
{{- end }}
- name: tls
  mountPath: /run/relay/tls
  readOnly: true
- name: data
  mountPath: /var/lib/relay
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
The init container that issues the pod's certificate from the CA (relay/cli/podcert.py):
include "e2ee-relay.certInit" (list . NODE_ID_ARGS HOSTS_JSON)
*/}}
{{- define "e2ee-relay.certInit" -}}
{{- $ := index . 0 -}}
- name: issue-certificate
  image: {{ include "e2ee-relay.image" $ }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  command: [python, -m, relay.cli.podcert]
  args:
    - --ca-cert=/etc/relay/ca/tls.crt
    - --ca-key=/etc/relay/ca/tls.key
    - --out=/run/relay/tls
    - --days={{ $.Values.tls.days }}
    {{- with index . 1 }}
    - --node-id={{ . }}
    {{- end }}
    - --host=$(POD_IP)
    - --host=127.0.0.1
    - --host=localhost
    {{- range index . 2 }}
    - --host={{ . }}
    {{- end }}
    {{- range $.Values.tls.hosts }}
    - --host={{ . }}
    {{- end }}
  env:
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
  securityContext:
    {{- toYaml $.Values.securityContext | nindent 4 }}
  resources:
    requests:
      cpu: 50m
      memory: 64Mi
    limits:
      memory: 128Mi
  volumeMounts:
    - name: ca
      mountPath: /etc/relay/ca
      readOnly: true
    - name: tls
      mountPath: /run/relay/tls
{{- end }}

{{/* An exec gRPC health probe over TLS (Kubernetes' own gRPC probe speaks plaintext only). */}}
{{- define "e2ee-relay.healthProbe" -}}
exec:
  command:
    - grpc_health_probe
    - -addr=127.0.0.1:{{ . }}
    - -tls
    - -tls-ca-cert=/run/relay/tls/ca.crt
    - -tls-server-name=127.0.0.1
    - -connect-timeout=2s
    - -rpc-timeout=2s
{{- end }}

{{/* Preferred anti-affinity: one pod of a component per node where possible. */}}
{{- define "e2ee-relay.affinity" -}}
{{- $ := index . 0 -}}
{{- $affinity := index . 1 -}}
{{- if $affinity }}
{{- toYaml $affinity }}
{{- else }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "e2ee-relay.selector" (list $ (index . 2)) | nindent 12 }}
{{- end }}
{{- end }}
