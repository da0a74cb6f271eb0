{{/*
The pod template of one role: dict "root" $ "role" ROLE "key" VALUES-KEY "kind" WORKLOAD-KIND
("restartPolicy" for Jobs).
Everything a role needs comes from env vars SPLITFED_* (the options of `splitfed serve ROLE`).
*/}}
{{- define "splitfed.rolePodTemplate" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $values := index $root.Values .key -}}
{{- $ctx := dict "root" $root "component" $role -}}
{{- $gpu := false -}}
{{- if $values.gpu }}{{ $gpu = $values.gpu.enabled }}{{ end -}}
{{- /* What the role's declaration says (files/roles.json): $signs, a party with a key of its own
(all but the relay); $namesData, one that takes the data set's name (not the relay nor the
p2p-tracker, which trains nothing); $peer, a decentralized peer (p2p-peer, smpl-peer), whose
--peer-index is its completion index in an Indexed Job or its ordinal in a StatefulSet ($peerJob:
the former, splitfed.peerKind). Which roles read data, and from where, is splitfed.roleData's. */ -}}
{{- $spec := index (include "splitfed.roles" $root | fromJson) $role -}}
{{- $signs := $spec.signs -}}
{{- $namesData := $spec.namesData -}}
{{- $peer := $spec.peer -}}
{{- $peerJob := and $peer (eq (include "splitfed.peerKind" $root) "Job") -}}
{{- $clients := int $root.Values.splitClient.replicas -}}
{{- $severalClients := gt $clients 1 -}}
{{- $keys := $root.Values.keys.existingSecret -}}
{{- $data := $root.Values.data -}}
{{- /* $roleData: its data volume and folder (splitfed.roleData). For a role that takes a task
(takesTask: all that train): $task, its SPLITFED_TASK, and $taskMap, the ConfigMap the task file
is mounted from (none for a module in the images). */ -}}
{{- $roleData := include "splitfed.roleData" (dict "root" $root "role" $role "kind" .kind) | fromJson -}}
{{- $task := "" -}}
{{- $taskMap := "" -}}
{{- if $spec.takesTask -}}
{{- $task = include "splitfed.taskValue" $root -}}
{{- $taskMap = include "splitfed.taskConfigMap" $root -}}
{{- end -}}
metadata:
  labels:
    {{- include "splitfed.labels" $ctx | nindent 4 }}
  {{- if and $taskMap $root.Values.task.file }}
  annotations:
    # A changed task file restarts the pods that read it (a ConfigMap's new text reaches a mounted
    # volume, but not a process that has loaded the old one). 16 hex digits tell texts apart.
    checksum/task: {{ $root.Values.task.file | sha256sum | trunc 16 }}
  {{- end }}
spec:
  {{- with .restartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  serviceAccountName: {{ include "splitfed.serviceAccountName" $root }}
  # No role talks to the Kubernetes API.
  automountServiceAccountToken: false
  securityContext:
    {{- include "splitfed.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $nodeSelector := merge (dict) (deepCopy ($values.nodeSelector | default dict)) (ternary $root.Values.gpu.nodeSelector dict $gpu) }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := concat ($values.tolerations | default list) (ternary $root.Values.gpu.tolerations list $gpu) }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with include "splitfed.affinity" (dict "root" $root "component" $role "affinity" $values.affinity "spread" ($values.antiAffinity | default "none")) }}
  affinity:
    {{- . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ $role }}
      image: {{ include "splitfed.image" (dict "root" $root "key" .key) | quote }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      securityContext:
        {{- include "splitfed.containerSecurityContext" dict | nindent 8 }}
      env:
        {{- if eq $role "fedavg-worker" }}
        # Identity from the pod: its ordinal is its share, and names it worker-N, as
        # `splitfed keys generate --workers N` names the workers of the key list.
        - name: SPLITFED_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        - name: SPLITFED_WORKER_ID
          value: worker-$(SPLITFED_INDEX)
        {{- end }}
        {{- if eq $role "split-client" }}
        # Which client this is: the pod's completion index in the Indexed Job, its share of the
        # data, and (among several) its name split-client-INDEX, as in the key list.
        - name: SPLITFED_CLIENT_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
        {{- end }}
        {{- if $peer }}
        # Which peer this is: the pod's {{ ternary "completion index (an Indexed Job)" "ordinal (a StatefulSet)" $peerJob }} is its share
        # of the data and names it {{ $role }}-INDEX, as in the key list; SPLITFED_PEERS: the replicas.
        - name: SPLITFED_PEER_INDEX
          valueFrom:
            fieldRef:
              {{- if $peerJob }}
              fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
              {{- else }}
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
              {{- end }}
        - name: SPLITFED_PEERS
          value: {{ $values.replicas | quote }}
        {{- end }}
        - name: SPLITFED_SESSION
          value: {{ include "splitfed.session" $root | quote }}
        {{- include "splitfed.brokerEnv" $root | trim | nindent 8 }}
        - name: SPLITFED_METRICS_PORT
          value: {{ $root.Values.metrics.port | quote }}
        {{- if $namesData }}
        - name: SPLITFED_DATASET
          value: {{ $data.dataset | quote }}
        {{- range $name, $key := dict "SPLITFED_LABEL_COLUMN" "labelColumn" "SPLITFED_CLASSES" "classes" "SPLITFED_IMAGE_SIZE" "imageSize" }}
        {{- with index $data $key }}
        - name: {{ $name }}
          value: {{ . | quote }}
        {{- end }}
        {{- end }}
        {{- end }}
        {{- with $roleData.dir }}
        # The party's data folder; {party} and {index} are filled in by the role itself.
        - name: SPLITFED_DATA_DIR
          value: {{ . | quote }}
        {{- end }}
        {{- with $task }}
        - name: SPLITFED_TASK
          value: {{ . | quote }}
        {{- end }}
        {{- if $keys }}
        - name: SPLITFED_KEY_LIST
          value: /etc/splitfed/keys/{{ $root.Values.keys.keyListKey }}
        {{- if eq $role "fedavg-worker" }}
        - name: SPLITFED_PRIVATE_KEY
          value: /etc/splitfed/keys/$(SPLITFED_WORKER_ID).key
        {{- else if and (eq $role "split-client") $severalClients }}
        - name: SPLITFED_PRIVATE_KEY
          value: /etc/splitfed/keys/split-client-$(SPLITFED_CLIENT_INDEX).key
        {{- else if $peer }}
        - name: SPLITFED_PRIVATE_KEY
          value: /etc/splitfed/keys/{{ $role }}-$(SPLITFED_PEER_INDEX).key
        {{- else if $signs }}
        - name: SPLITFED_PRIVATE_KEY
          value: /etc/splitfed/keys/{{ $role }}.key
        {{- end }}
        {{- end }}
        {{- if has $role (list "split-client" "split-server") }}
        - name: SPLITFED_VIA
          value: {{ ternary "relay" "direct" $root.Values.relay.enabled | quote }}
        {{- end }}
        {{- if has $role (list "split-client" "split-server" "split-fed") }}
        - name: SPLITFED_CLIENTS
          value: {{ $clients | quote }}
        {{- end }}
        {{- if hasPrefix "fedavg-" $role }}
        - name: SPLITFED_WORKERS
          value: {{ $root.Values.fedavgWorker.replicas | quote }}
        {{- end }}
        {{- if and (eq $role "fedavg-server") $values.persistence.enabled }}
        - name: SPLITFED_CHECKPOINT_DIR
          value: /var/lib/splitfed/checkpoint
        {{- end }}
        {{- /* Learning settings: the family's shared ones, then the role's own (which win). The lead
        roles (the Jobs) print progress events and, last, their result as JSON lines on stdout,
        which `splitfed launch` and `splitfed status` read from their logs; a setting turns it off. */}}
        {{- /* The shared settings of its family (none for the relay); a role of several families,
        the p2p-tracker, takes its peers' family: p2p.settings, or smpl.settings with smplPeer.enabled. */}}
        {{- $families := $spec.settingsFamilies }}
        {{- $shared := dict }}
        {{- if eq (len $families) 1 }}{{ $shared = (index $root.Values (first $families)).settings | default dict }}{{ end }}
        {{- if gt (len $families) 1 }}{{ $shared = (index $root.Values (include "splitfed.peerFamily" $root)).settings | default dict }}{{ end }}
        {{- /* set, not merge: merge would let a shared value beat a role's own false or 0. */}}
        {{- $settings := deepCopy $shared }}
        {{- range $name, $value := $values.settings | default dict }}{{ $_ := set $settings $name $value }}{{ end }}
        {{- $leads := list "fedavg-server" (include "splitfed.splitLead" $root) "p2p-tracker" }}
        {{- if and (has $role $leads) (not (hasKey $settings "progress-events")) }}
        {{- $_ := set $settings "progress-events" true }}
        {{- end }}
        {{- /* A role given a GPU computes on it, whatever device its family's shared settings name
        (they reach roles without one too); only its own settings choose otherwise. */}}
        {{- if and $gpu (not (hasKey ($values.settings | default dict) "device")) }}
        {{- $_ := set $settings "device" "cuda" }}
        {{- end }}
        {{- range $name, $value := $settings }}
        {{- if not (kindIs "invalid" $value) }}
        - name: {{ printf "SPLITFED_%s" ($name | upper | replace "-" "_") }}
          value: {{ include "splitfed.envText" $value | quote }}
        {{- end }}
        {{- end }}
        {{- with $values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: metrics
          containerPort: {{ $root.Values.metrics.port }}
          protocol: TCP
      {{- if $values.probes.enabled }}
      {{- range $probe := list "readinessProbe" "livenessProbe" }}
      {{ $probe }}:
        httpGet:
          path: /metrics
          port: metrics
        initialDelaySeconds: {{ $values.probes.initialDelaySeconds }}
        periodSeconds: {{ $values.probes.periodSeconds }}
        failureThreshold: {{ $values.probes.failureThreshold }}
      {{- end }}
      {{- end }}
      resources:
        {{- $resources := deepCopy ($values.resources | default dict) }}
        {{- if $gpu }}
        {{- $limits := merge (dict $root.Values.gpu.resourceName (toString ($values.gpu.count | default 1))) ($resources.limits | default dict) }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        # The root file system is read-only; /tmp is the one place a role may write scratch files.
        - name: tmp
          mountPath: /tmp
        {{- if $keys }}
        - name: keys
          mountPath: /etc/splitfed/keys
          readOnly: true
        {{- end }}
        {{- include "splitfed.brokerMount" $root | trim | nindent 8 }}
        {{- if $roleData.dir }}
        - name: data
          mountPath: {{ $data.mountPath }}
          readOnly: true
        {{- end }}
        {{- if $taskMap }}
        - name: task
          mountPath: /etc/splitfed/task
          readOnly: true
        {{- end }}
        {{- if and (eq $role "fedavg-server") $values.persistence.enabled }}
        - name: checkpoint
          mountPath: /var/lib/splitfed/checkpoint
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    {{- if $keys }}
    - name: keys
      secret:
        secretName: {{ $keys }}
        # Group-readable: the files belong to root and the pod's group (fsGroup) reads them.
        defaultMode: 0440
        {{- if ne $role "fedavg-worker" }}
        # Only the key list and this party's own key. Workers get the whole Secret, since a
        # StatefulSet cannot give each pod a Secret of its own: each worker can read every key in it.
        # Several split clients, the pods of one Job, likewise share one volume: it holds every
        # client's key (split-client-0.key ...), and no other party's; so do the peers of one
        # Job or StatefulSet (p2p-peer-0.key ...).
        items:
          - key: {{ $root.Values.keys.keyListKey }}
            path: {{ $root.Values.keys.keyListKey }}
          {{- if and (eq $role "split-client") $severalClients }}
          {{- range $index := until $clients }}
          - key: split-client-{{ $index }}.key
            path: split-client-{{ $index }}.key
          {{- end }}
          {{- else if $peer }}
          {{- range $index := until (int $values.replicas) }}
          - key: {{ $role }}-{{ $index }}.key
            path: {{ $role }}-{{ $index }}.key
          {{- end }}
          {{- else if $signs }}
          - key: {{ $role }}.key
            path: {{ $role }}.key
          {{- end }}
        {{- end }}
    {{- end }}
    {{- include "splitfed.brokerVolume" $root | trim | nindent 4 }}
    {{- with $roleData.volume }}
    - name: data
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- if $taskMap }}
    - name: task
      configMap:
        name: {{ $taskMap }}
        # Only the task file: a missing key keeps the pod from starting, and says which.
        items:
          - key: {{ $root.Values.task.key }}
            path: {{ $root.Values.task.key }}
    {{- end }}
    {{- if and (eq $role "fedavg-server") $values.persistence.enabled }}
    - name: checkpoint
      persistentVolumeClaim:
        claimName: {{ include "splitfed.checkpointClaim" $root }}
    {{- end }}
{{- end -}}
