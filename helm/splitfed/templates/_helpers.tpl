{{/* Names, labels and the pieces every role's pod shares. */}}

{{- define "splitfed.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "splitfed.fullname" -}}
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

{{/* "component" names: the role name, or broker / broker-test. Object name: fullname-component. */}}
{{- define "splitfed.componentName" -}}
{{- printf "%s-%s" (include "splitfed.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "splitfed.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: name + instance (+ component, to tell roles apart). Never change on upgrade. */}}
{{- define "splitfed.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitfed.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "splitfed.labels" -}}
{{ include "splitfed.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: splitfed
helm.sh/chart: {{ include "splitfed.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "splitfed.session" -}}
{{- default .Release.Name .Values.session -}}
{{- end -}}

{{- define "splitfed.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "splitfed.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The roles as declared (JSON, role name -> what the templates do by it: valuesKey,
settingsFamilies, signs, namesData, readsData, peer), which ci/chart_schema.py writes from the role
declarations; use it as `include "splitfed.roles" $root | fromJson`. */}}
{{- define "splitfed.roles" -}}
{{- .Files.Get "files/roles.json" -}}
{{- end -}}

{{/* Names of the enabled roles, in name order, as a YAML list (for NetworkPolicy and PodMonitor selectors). */}}
{{- define "splitfed.enabledRoles" -}}
{{- $root := . -}}
{{- range $role, $spec := include "splitfed.roles" . | fromJson }}
{{- if (index $root.Values $spec.valuesKey).enabled }}
- {{ $role }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A setting of a role as the role gets it: dict "root" $ "key" VALUES-KEY "family" FAMILY
"name" FLAG "default" D: the role's own settings, else its family's shared FAMILY.settings, else D
(the role's declared default, which tests/chart checks against the declaration). */}}
{{- define "splitfed.roleSetting" -}}
{{- $own := (index .root.Values .key).settings | default dict -}}
{{- $shared := (index .root.Values .family).settings | default dict -}}
{{- if and (hasKey $own .name) (not (kindIs "invalid" (index $own .name))) -}}
{{- include "splitfed.envText" (index $own .name) -}}
{{- else if and (hasKey $shared .name) (not (kindIs "invalid" (index $shared .name))) -}}
{{- include "splitfed.envText" (index $shared .name) -}}
{{- else -}}
{{- .default -}}
{{- end -}}
{{- end -}}

{{/* A setting of a split role (dict "root" $ "key" VALUES-KEY "name" FLAG "default" D), over split.settings. */}}
{{- define "splitfed.splitSetting" -}}
{{- include "splitfed.roleSetting" (dict "root" .root "key" .key "family" "split" "name" .name "default" .default) -}}
{{- end -}}

{{/* How the split clients share the server (--schedule), as the split-server runs it. */}}
{{- define "splitfed.splitSchedule" -}}
{{- include "splitfed.splitSetting" (dict "root" . "key" "splitServer" "name" "schedule" "default" "splitfed-v2") -}}
{{- end -}}

{{/* "true" when the split run has a split-fed: several clients in parallel (splitfed-v1, v2);
round-robin passes the layers from client to client, and one client has nothing to average. */}}
{{- define "splitfed.splitHasFed" -}}
{{- if and (gt (int .Values.splitClient.replicas) 1) (ne (include "splitfed.splitSchedule" .) "round-robin") -}}true{{- end -}}
{{- end -}}

{{/* The lead of a split run, which prints progress events and, last, its result: the one client,
or, among several, the server (it closes the epochs and holds the run's history). */}}
{{- define "splitfed.splitLead" -}}
{{- ternary "split-server" "split-client" (gt (int .Values.splitClient.replicas) 1) -}}
{{- end -}}

{{/* Decentralized training: the peers' role, smpl-peer with smplPeer.enabled, else p2p-peer
(validate.yaml refuses both in one release), and its family, whose shared settings (p2p.settings,
smpl.settings) reach the tracker as well as the peers. */}}
{{- define "splitfed.peerRole" -}}
{{- ternary "smpl-peer" "p2p-peer" (and .Values.smplPeer.enabled (not .Values.p2pPeer.enabled)) -}}
{{- end -}}

{{- define "splitfed.peerFamily" -}}
{{- first (index (include "splitfed.roles" . | fromJson) (include "splitfed.peerRole" .)).settingsFamilies -}}
{{- end -}}

{{/* The values key of the peers' role (p2pPeer, smplPeer). */}}
{{- define "splitfed.peerKey" -}}
{{- (index (include "splitfed.roles" . | fromJson) (include "splitfed.peerRole" .)).valuesKey -}}
{{- end -}}

{{/* The tracker's --expect-peers (its own settings only: the peers have no such option). */}}
{{- define "splitfed.trackerExpects" -}}
{{- include "splitfed.roleSetting" (dict "root" . "key" "p2pTracker" "family" (include "splitfed.peerFamily" .) "name" "expect-peers" "default" "0") -}}
{{- end -}}

{{/* "true" when the tracker ends: with expect-peers N it finishes once N peers have registered
and none is live any more, printing the run's result (a Job); with 0 it serves the session until
it is uninstalled (a Deployment). */}}
{{- define "splitfed.trackerEnds" -}}
{{- if gt (int (include "splitfed.trackerExpects" .)) 0 -}}true{{- end -}}
{{- end -}}

{{/* The peers' workload, which follows the tracker's: "Job" (Indexed: completion index = peer
index) when the tracker ends with the run, so that a peer that has finished stays finished and the
tracker sees none live; "StatefulSet" (pod ordinal = peer index) when it serves until uninstalled,
where a peer that has finished is restarted and rejoins. */}}
{{- define "splitfed.peerKind" -}}
{{- ternary "Job" "StatefulSet" (eq (include "splitfed.trackerEnds" .) "true") -}}
{{- end -}}

{{/* Pod security: the same for every splitfed pod (the images' user is 10001). */}}
{{- define "splitfed.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "splitfed.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .runAsUser | default 10001 }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Broker: the Secret with the credentials, and whether it holds a ready URL (the chart's own). */}}
{{- define "splitfed.brokerSecretName" -}}
{{- if .Values.broker.external.enabled -}}
{{- .Values.broker.external.existingSecret -}}
{{- else -}}
{{- default (printf "%s-broker" (include "splitfed.fullname" .)) .Values.broker.rabbitmq.auth.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "splitfed.brokerHost" -}}
{{- if .Values.broker.external.enabled -}}
{{- .Values.broker.external.host -}}
{{- else -}}
{{- printf "%s-broker" (include "splitfed.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The governing (headless) Service of the chart's RabbitMQ: it gives each broker pod a stable
DNS name, <pod>.<headless>, which the nodes cluster by and the roles fail over to. */}}
{{- define "splitfed.brokerHeadless" -}}
{{- printf "%s-headless" (include "splitfed.componentName" (dict "root" . "component" "broker")) -}}
{{- end -}}

{{/* The hosts a role tries in turn, comma-separated: each pod of the chart's RabbitMQ cluster,
then its Service (which routes to any ready node) as the last resort; one broker: its host. */}}
{{- define "splitfed.brokerHosts" -}}
{{- $hosts := list -}}
{{- $replicas := int .Values.broker.rabbitmq.replicas -}}
{{- if and (not .Values.broker.external.enabled) (gt $replicas 1) -}}
{{- $statefulSet := include "splitfed.componentName" (dict "root" . "component" "broker") -}}
{{- range $ordinal := until $replicas -}}
{{- $hosts = append $hosts (printf "%s-%d.%s" $statefulSet $ordinal (include "splitfed.brokerHeadless" $)) -}}
{{- end -}}
{{- end -}}
{{- append $hosts (include "splitfed.brokerHost" .) | join "," -}}
{{- end -}}

{{/* The broker URLs, comma-separated (what --broker takes): dict "root" $ "credentials" "user:pass",
the credentials already percent-encoded, or $(VAR) references the kubelet fills in. */}}
{{- define "splitfed.brokerUrls" -}}
{{- $root := .root -}}
{{- $scheme := ternary "amqps" "amqp" (eq (include "splitfed.brokerTLS" $root) "true") -}}
{{- $urls := list -}}
{{- range $host := splitList "," (include "splitfed.brokerHosts" $root) -}}
{{- $userinfo := ternary (printf "%s@" $.credentials) "" (ne $.credentials "") -}}
{{- $urls = append $urls (printf "%s://%s%s:%s/%s" $scheme $userinfo $host (include "splitfed.brokerPort" $root) (urlquery $root.Values.broker.vhost)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* Durable queue type, the same for every party of the session: the value, or quorum where the
chart's own RabbitMQ has 3 nodes or more (a quorum queue keeps working while a majority of its
replicas does), else classic (one node: nothing to replicate to; an external broker: the chart
cannot tell its size, so set queueType). */}}
{{- define "splitfed.queueType" -}}
{{- if .Values.queueType -}}
{{- .Values.queueType -}}
{{- else if and (not .Values.broker.external.enabled) (ge (int .Values.broker.rabbitmq.replicas) 3) -}}
quorum
{{- else -}}
classic
{{- end -}}
{{- end -}}

{{/* A pod's affinity: dict "root" $ "component" C "affinity" VALUES "spread" MODE. The given
affinity, plus a podAntiAffinity that spreads the component's pods over nodes (kubernetes.io/hostname),
so that losing one node takes at most one of them: MODE "preferred" (the scheduler tries) or
"required" (a pod stays Pending rather than share a node); "none", or a podAntiAffinity of the
values' own, leaves the affinity as given. */}}
{{- define "splitfed.affinity" -}}
{{- $affinity := deepCopy (.affinity | default dict) -}}
{{- if and (has .spread (list "preferred" "required")) (not (hasKey $affinity "podAntiAffinity")) -}}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "splitfed.selectorLabels" (dict "root" .root "component" .component) | fromYaml)) -}}
{{- if eq .spread "required" -}}
{{- $_ := set $affinity "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) -}}
{{- else -}}
{{- $_ := set $affinity "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) -}}
{{- end -}}
{{- end -}}
{{- with $affinity }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{- define "splitfed.brokerPort" -}}
{{- if .Values.broker.external.enabled -}}{{ .Values.broker.external.port }}{{- else -}}5672{{- end -}}
{{- end -}}

{{/* The chart's own Secret keeps a ready URL under "url". */}}
{{- define "splitfed.brokerUrlKey" -}}
{{- if .Values.broker.external.enabled -}}
{{- .Values.broker.external.urlKey -}}
{{- else if not .Values.broker.rabbitmq.auth.existingSecret -}}
url
{{- end -}}
{{- end -}}

{{- define "splitfed.brokerTLS" -}}
{{- if and .Values.broker.external.enabled .Values.broker.external.tls.enabled -}}true{{- end -}}
{{- end -}}

{{/* Env vars for the broker: where its URLs and credentials are, and the queue type. The
credentials appear neither in the manifest nor in the environment (which shows in
/proc/PID/environ and crash reports): the role reads them from the broker Secret, mounted at
/etc/splitfed/broker (splitfed.brokerVolume), either as the whole URL list (the Secret's `url`, or
broker.external.urlKey) or as a user name and password, which it puts into the URLs given here. */}}
{{- define "splitfed.brokerEnv" -}}
{{- if include "splitfed.brokerUrlKey" . }}
- name: SPLITFED_BROKER_FILE
  value: /etc/splitfed/broker/url
{{- else }}
- name: SPLITFED_BROKER
  value: {{ include "splitfed.brokerUrls" (dict "root" . "credentials" "") | quote }}
- name: SPLITFED_BROKER_CREDENTIALS
  value: /etc/splitfed/broker
{{- end }}
- name: SPLITFED_QUEUE_TYPE
  value: {{ include "splitfed.queueType" . | quote }}
{{- if include "splitfed.brokerTLS" . }}
{{- $tls := .Values.broker.external.tls }}
- name: SPLITFED_TLS_CA
  value: /etc/splitfed/tls/{{ $tls.caKey }}
{{- if and $tls.certKey $tls.keyKey }}
- name: SPLITFED_TLS_CERT
  value: /etc/splitfed/tls/{{ $tls.certKey }}
- name: SPLITFED_TLS_KEY
  value: /etc/splitfed/tls/{{ $tls.keyKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The broker Secret's credentials as files (splitfed.brokerEnv says which), readable by the
pod's fsGroup only. */}}
{{- define "splitfed.brokerVolume" -}}
{{- $ext := .Values.broker.external -}}
- name: broker-credentials
  secret:
    secretName: {{ include "splitfed.brokerSecretName" . }}
    defaultMode: 0440
    items:
      {{- with include "splitfed.brokerUrlKey" . }}
      - key: {{ . }}
        path: url
      {{- else }}
      - key: {{ ternary $ext.usernameKey "username" $ext.enabled }}
        path: username
      - key: {{ ternary $ext.passwordKey "password" $ext.enabled }}
        path: password
      {{- end }}
{{- include "splitfed.brokerTLSVolume" . }}
{{- end -}}

{{- define "splitfed.brokerMount" -}}
- name: broker-credentials
  mountPath: /etc/splitfed/broker
  readOnly: true
{{- include "splitfed.brokerTLSMount" . }}
{{- end -}}

{{- define "splitfed.brokerTLSVolume" -}}
{{- if include "splitfed.brokerTLS" . }}
- name: broker-tls
  secret:
    secretName: {{ .Values.broker.external.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "splitfed.brokerTLSMount" -}}
{{- if include "splitfed.brokerTLS" . }}
- name: broker-tls
  mountPath: /etc/splitfed/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* The fedavg-server's checkpoint claim: an existing one, or the chart's. */}}
{{- define "splitfed.checkpointClaim" -}}
{{- default (include "splitfed.componentName" (dict "root" . "component" "fedavg-server-checkpoint")) .Values.fedavgServer.persistence.existingClaim -}}
{{- end -}}

{{/* Its access modes, as a YAML list: the given ones, else ReadWriteMany when several server pods
(on different nodes) share the claim, ReadWriteOnce for one. */}}
{{- define "splitfed.checkpointAccessModes" -}}
{{- $persistence := .Values.fedavgServer.persistence -}}
{{- toYaml ($persistence.accessModes | default (list (ternary "ReadWriteMany" "ReadWriteOnce" (gt (int .Values.fedavgServer.replicas) 1)))) -}}
{{- end -}}

{{/* An env value as text: whole numbers without an exponent (YAML numbers arrive as floats). */}}
{{- define "splitfed.envText" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The image of a role: tag defaults to appVersion; a GPU role gets the CUDA build. */}}
{{- define "splitfed.image" -}}
{{- $values := index .root.Values .key -}}
{{- $tag := default .root.Chart.AppVersion $values.image.tag -}}
{{- if and $values.gpu $values.gpu.enabled -}}
{{- $tag = printf "%s%s" $tag .root.Values.gpu.imageTagSuffix -}}
{{- end -}}
{{- printf "%s:%s" $values.image.repository $tag -}}
{{- end -}}

{{/* A role's data, as JSON: dict "root" $ "role" ROLE "kind" WORKLOAD-KIND. {} for a role that
reads none (the relay, the tracker, the split-fed; a server with data.servers false; no source);
else "dir", its SPLITFED_DATA_DIR, and either "volume", the volume source every pod of the role
mounts, or "claimTemplate" true (a StatefulSet's claim per pod, splitfed.dataClaimTemplates).
The per-party sources mount one volume for all the pods of a role and name the party's folder in
it with {party}/{index}, which each role fills in itself: a pod template is the same for every pod
of a Job or StatefulSet, so it cannot name a folder or claim per pod. */}}
{{- define "splitfed.roleData" -}}
{{- $root := .root -}}
{{- $data := $root.Values.data -}}
{{- $perParty := $data.perParty -}}
{{- $spec := index (include "splitfed.roles" $root | fromJson) .role -}}
{{- $mountPath := trimSuffix "/" $data.mountPath -}}
{{- $out := dict -}}
{{- if and $spec.readsData (or $spec.dataOwner $data.servers) -}}
{{- if $perParty.hostPath -}}
{{- $hostRoot := include "splitfed.hostPathRoot" $perParty.hostPath -}}
{{- $out = dict "volume" (dict "hostPath" (dict "path" $hostRoot "type" "Directory")) "dir" (printf "%s%s" $mountPath (trimPrefix $hostRoot $perParty.hostPath)) -}}
{{- else if $perParty.existingClaim -}}
{{- $out = dict "volume" (dict "persistentVolumeClaim" (dict "claimName" $perParty.existingClaim "readOnly" true)) "dir" (printf "%s/%s" $mountPath (trimPrefix "/" $perParty.folder)) -}}
{{- else if $perParty.volumeClaimTemplate -}}
{{- if ne .kind "StatefulSet" -}}
{{- fail (printf "data.perParty.volumeClaimTemplate gives a claim to each pod of a StatefulSet; %s runs as a %s, which has none (a Job's pods could only get ephemeral volumes, made empty and deleted with each pod): use data.perParty.hostPath or existingClaim%s" .role .kind (ternary "" ", or give the servers no data (data.servers=false, with evaluate: parties)" $spec.dataOwner)) -}}
{{- end -}}
{{- $out = dict "claimTemplate" true "dir" (default "/" $mountPath) -}}
{{- else if $data.volume -}}
{{- $out = dict "volume" $data.volume "dir" (default "/" $mountPath) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The fixed folder of data.perParty.hostPath before its first placeholder: /srv/data of /srv/data/{party}. */}}
{{- define "splitfed.hostPathRoot" -}}
{{- regexReplaceAll "/[^/]*[{].*$" . "" -}}
{{- end -}}

{{/* The claim template of a StatefulSet role whose data is data.perParty.volumeClaimTemplate
(dict "root" $ "role" ROLE): a claim per ordinal, data-<statefulset>-<ordinal>, kept by the
StatefulSet across restarts and after uninstall. */}}
{{- define "splitfed.dataClaimTemplates" -}}
{{- $data := include "splitfed.roleData" (dict "root" .root "role" .role "kind" "StatefulSet") | fromJson -}}
{{- if $data.claimTemplate -}}
{{- $template := .root.Values.data.perParty.volumeClaimTemplate -}}
volumeClaimTemplates:
  - metadata:
      name: data
      labels:
        {{- include "splitfed.selectorLabels" (dict "root" .root "component" .role) | nindent 8 }}
    spec:
      accessModes:
        {{- toYaml ($template.accessModes | default (list "ReadWriteOnce")) | nindent 8 }}
      {{- with $template.storageClassName }}
      storageClassName: {{ . | quote }}
      {{- end }}
      resources:
        requests:
          storage: {{ $template.size | quote }}
{{- end -}}
{{- end -}}

{{/* The task's SPLITFED_TASK value: a file of the task ConfigMap, or a module; empty: none. */}}
{{- define "splitfed.taskValue" -}}
{{- $task := .Values.task -}}
{{- if or $task.file $task.configMap -}}
/etc/splitfed/task/{{ $task.key }}
{{- else -}}
{{- $task.module -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap the task file is mounted from: the chart's own (task.file) or an existing one. */}}
{{- define "splitfed.taskConfigMap" -}}
{{- if .Values.task.file -}}
{{- include "splitfed.componentName" (dict "root" . "component" "task") -}}
{{- else -}}
{{- .Values.task.configMap -}}
{{- end -}}
{{- end -}}
