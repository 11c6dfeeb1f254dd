{{/*
Shared pieces of the traffic-manager chart.
*/}}

{{/* The image reference of an image block: [registry/]name:tag, tag defaulting to appVersion. */}}
{{- define "tm.image" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- if .image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .image.registry) .image.name $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.name $tag -}}
{{- end -}}
{{- end -}}

{{- /* The agent's image: each empty field of agent.image is the manager image's. */ -}}
{{- define "tm.agentImage" -}}
{{- $agent := .Values.agent.image -}}
{{- $image := dict "registry" ($agent.registry | default .Values.image.registry) "name" ($agent.name | default .Values.image.name) "tag" ($agent.tag | default .Values.image.tag) -}}
{{- include "tm.image" (dict "image" $image "root" .) -}}
{{- end -}}

{{- define "tm.labels" -}}
app.kubernetes.io/name: traffic-manager
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels that select the manager's pods (the Deployment selector: never change them). */}}
{{- define "tm.selectorLabels" -}}
app: traffic-manager
telepresence: manager
{{- end -}}

{{- define "tm.clusterName" -}}
{{- printf "traffic-manager-%s" .Release.Namespace -}}
{{- end -}}

{{- define "tm.webhookName" -}}
{{- printf "%s-%s" .Values.agentInjector.webhook.name .Release.Namespace -}}
{{- end -}}

{{/*
The manager's scope as JSON: {"mode": "cluster"|"static"|"dynamic", "names": [...]}.
Seed 004: a selector that only requires kubernetes.io/metadata.name In [...] (or the namespaces
short form) is static; any other requirement makes it dynamic; neither value means cluster-wide.
*/}}
{{- define "tm.scope" -}}
{{- $nameKey := "kubernetes.io/metadata.name" -}}
{{- if and .Values.namespaces .Values.namespaceSelector -}}
{{- fail "namespaces and namespaceSelector are mutually exclusive: set one of them" -}}
{{- end -}}
{{- if .Values.namespaces -}}
{{- dict "mode" "static" "names" (.Values.namespaces | uniq | sortAlpha) | toJson -}}
{{- else if .Values.namespaceSelector -}}
{{- $static := true -}}
{{- $names := list -}}
{{- $first := true -}}
{{- $sets := list -}}
{{- range $key, $value := (.Values.namespaceSelector.matchLabels | default dict) -}}
{{- if eq $key $nameKey -}}
{{- $sets = append $sets (list $value) -}}
{{- else -}}
{{- $static = false -}}
{{- end -}}
{{- end -}}
{{- range (.Values.namespaceSelector.matchExpressions | default list) -}}
{{- if and (eq .key $nameKey) (eq .operator "In") -}}
{{- $sets = append $sets (.values | default list) -}}
{{- else -}}
{{- $static = false -}}
{{- end -}}
{{- end -}}
{{- if not $sets -}}
{{- $static = false -}}
{{- end -}}
{{- if $static -}}
{{- $names = first $sets -}}
{{- range (rest $sets) -}}
{{- $set := . -}}
{{- $kept := list -}}
{{- range $names -}}
{{- if has . $set -}}
{{- $kept = append $kept . -}}
{{- end -}}
{{- end -}}
{{- $names = $kept -}}
{{- end -}}
{{- dict "mode" "static" "names" ($names | uniq | sortAlpha) | toJson -}}
{{- else -}}
{{- dict "mode" "dynamic" "names" (list) | toJson -}}
{{- end -}}
{{- else -}}
{{- dict "mode" "cluster" "names" (list) | toJson -}}
{{- end -}}
{{- end -}}

{{/* The webhook's and the manager's namespace selector. */}}
{{- define "tm.webhookNamespaceSelector" -}}
{{- $scope := include "tm.scope" . | fromJson -}}
{{- if eq $scope.mode "static" -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: In
    values: {{ $scope.names | toJson }}
{{- else if eq $scope.mode "dynamic" -}}
{{ toYaml .Values.namespaceSelector }}
{{- else -}}
{{- /* cluster-wide: never intercept the control plane's own pods */ -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values: ["kube-system", "kube-node-lease"]
{{- end -}}
{{- end -}}

{{/* What the manager needs in each namespace it manages. */}}
{{- define "tm.managedRules" -}}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods/eviction"]
  verbs: ["create"]
{{- /* the agents' logs, for `tele gather-logs` (a caller must be allowed them too) */}}
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["services", "endpoints", "configmaps"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- /* owner references are walked (pod -> replicaset -> deployment) whatever is enabled */}}
- apiGroups: ["apps"]
  resources: ["deployments", "replicasets", "statefulsets"]
  verbs: ["get", "list", "watch"]
{{- $patchable := list -}}
{{- if .Values.workloads.deployments.enabled }}{{ $patchable = append $patchable "deployments" }}{{ end -}}
{{- if .Values.workloads.replicaSets.enabled }}{{ $patchable = append $patchable "replicasets" }}{{ end -}}
{{- if .Values.workloads.statefulSets.enabled }}{{ $patchable = append $patchable "statefulsets" }}{{ end -}}
{{- if $patchable }}
- apiGroups: ["apps"]
  resources: {{ $patchable | toJson }}
  verbs: ["patch", "update"]
{{- end }}
{{- if .Values.workloads.argoRollouts.enabled }}
- apiGroups: ["argoproj.io"]
  resources: ["rollouts"]
  verbs: ["get", "list", "watch", "patch", "update"]
{{- end }}
{{- end -}}

{{/*
"true" when a label selector selects a namespace: dict "selector" S "name" N "labels" L.
*/}}
{{- define "tm.selects" -}}
{{- $labels := merge (dict "kubernetes.io/metadata.name" .name) (.labels | default dict) -}}
{{- $ok := true -}}
{{- range $key, $value := (.selector.matchLabels | default dict) -}}
{{- if or (not (hasKey $labels $key)) (ne (toString (get $labels $key)) (toString $value)) -}}
{{- $ok = false -}}
{{- end -}}
{{- end -}}
{{- range $e := (.selector.matchExpressions | default list) -}}
{{- $has := hasKey $labels $e.key -}}
{{- $in := and $has (has (toString (get $labels $e.key)) ($e.values | default list)) -}}
{{- if and (eq $e.operator "In") (not $in) }}{{ $ok = false }}{{ end -}}
{{- if and (eq $e.operator "NotIn") $in }}{{ $ok = false }}{{ end -}}
{{- if and (eq $e.operator "Exists") (not $has) }}{{ $ok = false }}{{ end -}}
{{- if and (eq $e.operator "DoesNotExist") $has }}{{ $ok = false }}{{ end -}}
{{- end -}}
{{- if $ok }}true{{ end -}}
{{- end -}}

{{/* A scope as a selector: dict "names" [...] "selector" {...} -> the selector to evaluate. */}}
{{- define "tm.asSelector" -}}
{{- if .names -}}
{{- dict "matchExpressions" (list (dict "key" "kubernetes.io/metadata.name" "operator" "In" "values" .names)) | toJson -}}
{{- else -}}
{{- .selector | default dict | toJson -}}
{{- end -}}
{{- end -}}
