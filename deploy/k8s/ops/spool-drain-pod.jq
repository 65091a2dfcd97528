# A one-off pod that drains one retained spool claim of callstatus-ingest (prod).
#
# Why: scaling the ingest StatefulSet down leaves the claims of removed ordinals behind
# (they are retained on purpose), possibly with events Kafka has not got yet. Scaling
# back up drains them (deploy/README.md "The spool on Kubernetes"); where that is not
# wanted, run this pod on the claim instead:
#
#   kubectl -n callstatus get pod callstatus-ingest-0 -o json \
#     | jq --arg claim spool-callstatus-ingest-7 -f deploy/k8s/ops/spool-drain-pod.jq \
#     | kubectl -n callstatus apply -f -
#
# It copies a RUNNING ingest pod (so image, settings, secret, hardening and probes are
# exactly what runs, nothing restated here) and changes only:
#   - the name (callstatus-spool-drain-<ordinal>) and the component label (spool-drain):
#     no Service, PDB or HPA selects it, so it gets no webhooks, while the NetworkPolicy
#     (which selects app.kubernetes.io/name) still lets it reach Kafka;
#   - the spool volume: the claim named by $claim instead of the pod's own;
#   - what the API server and the StatefulSet controller filled in for the original
#     (node, hostname, priority, ownership, status).
# On start the service drains the spool it finds (while it keeps answering /healthz).
# Done when its callstatus_spool_events is 0 (kubectl port-forward, GET /metrics) and
# `kubectl exec <pod> -- callstatus spool dead-letter list` shows no event Kafka refused
# for good (replay them first: README "The spool"); then delete the pod, and the claim. The claim must not be mounted by a running ingest pod:
# on another node the attach fails, on the same node the spool's lock stops the second
# process at start; neither loses data.
{
  apiVersion: "v1",
  kind: "Pod",
  metadata: {
    name: ("callstatus-spool-drain-" + ($claim | split("-") | last)),
    labels: (
      .metadata.labels
      | with_entries(select(.key | startswith("app.kubernetes.io/")))
      | .["app.kubernetes.io/component"] = "spool-drain"
    )
  },
  spec: (
    .spec
    | del(.nodeName, .hostname, .subdomain, .priority)
    | .volumes |= map(
        if .name == "spool" then {name: "spool", persistentVolumeClaim: {claimName: $claim}}
        else . end
      )
  )
}
