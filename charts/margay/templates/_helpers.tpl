{{/* Image reference: repository@digest when a digest is set, else repository:tag. */}}
{{- define "margay.image" -}}
{{- $img := index .root.Values.images .name -}}
{{- if $img.digest -}}
{{ $img.repository }}@{{ $img.digest }}
{{- else -}}
{{ $img.repository }}:{{ $img.tag | default .root.Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "margay.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: margay
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "margay.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* Datastore settings every component reads. */}}
{{- define "margay.datastoreEnv" -}}
- name: MARGAY_DATASTORE_TYPE
  value: {{ .Values.datastore.type | quote }}
{{- if eq .Values.datastore.type "etcd" }}
- name: MARGAY_ETCD_ENDPOINTS
  value: {{ join "," .Values.datastore.etcd.endpoints | quote }}
{{- if .Values.datastore.etcd.prefix }}
- name: MARGAY_ETCD_PREFIX
  value: {{ .Values.datastore.etcd.prefix | quote }}
{{- end }}
{{- if .Values.datastore.etcd.tlsSecret }}
- name: MARGAY_ETCD_CA_FILE
  value: /etc/margay/etcd-tls/ca.crt
- name: MARGAY_ETCD_CERT_FILE
  value: /etc/margay/etcd-tls/tls.crt
- name: MARGAY_ETCD_KEY_FILE
  value: /etc/margay/etcd-tls/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{- define "margay.etcdTlsMount" -}}
{{- if and (eq .Values.datastore.type "etcd") .Values.datastore.etcd.tlsSecret }}
- name: etcd-tls
  mountPath: /etc/margay/etcd-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "margay.etcdTlsVolume" -}}
{{- if and (eq .Values.datastore.type "etcd") .Values.datastore.etcd.tlsSecret }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.datastore.etcd.tlsSecret }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{/* Fails the render with a message when values contradict each other. */}}
{{- define "margay.validate" -}}
{{- if and (eq .Values.datastore.type "etcd") (empty .Values.datastore.etcd.endpoints) -}}
{{- fail "datastore.type is etcd but datastore.etcd.endpoints is empty" -}}
{{- end -}}
{{- if and (not .Values.bgp.nodeToNodeMesh) (not .Values.routeReflectors.enabled) (empty .Values.bgp.peers) .Values.bgp.enabled -}}
{{- fail "bgp.nodeToNodeMesh is off and there are no route reflectors or bgp.peers: nodes would learn no routes" -}}
{{- end -}}
{{- end -}}
