"""Validate the farm's cluster definitions: ``farm cluster validate cluster/*.yaml``.

Two kinds of file are understood:

* a Ray cluster launcher config (``ray up FILE``; it has a ``provider:``), checked against Ray's own
  schema (``ray/autoscaler/ray-schema.json``, the file ``ray up`` validates with) and Ray's own
  preparation (defaults filled in, then ``validate_config``), then against the farm's rules;
* a KubeRay ``RayCluster`` manifest (``kind: RayCluster``), checked against KubeRay's own CRD
  schema (vendored from KubeRay 1.7.0, strict as ``kubectl apply`` is: unknown fields are
  errors), then with a pydantic model of the fields the farm relies on, then the same rules.

The farm's rules, in both kinds: GPU workers scale to zero and have a ceiling, at least one
worker type has a GPU, idle nodes are reclaimed, token authentication is on everywhere Ray
starts, the dashboard / Jobs API (which runs arbitrary code) is not exposed, and checkpoints go
to shared storage (``FARM_STORAGE``).

Every problem is one string, ``"<file>: <key.path>: <reason>"``; an empty list means valid.
"""

from __future__ import annotations

import contextlib
import functools
import copy
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from farm.jsonwords import shown

LAUNCHER = "ray launcher"
KUBERAY = "kuberay"
MANIFESTS = "kubernetes"
UNKNOWN = "unknown"

TOP = "(top level)"

# Providers that run "nodes" as local processes (tests): no shared storage to configure, and no
# `ray start` commands (the test starts the head itself).
_FAKE_PROVIDERS = {"fake_multinode", "fake_multinode_docker"}
# EC2 families with NVIDIA GPUs, for node types whose GPUs Ray autodetects from the instance type.
_GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.", re.IGNORECASE)
_RAY_START = re.compile(r"\bray\s+start\b")
_TOKEN_MODE = re.compile(r"""\bRAY_AUTH_MODE=["']?token\b""")
_DASHBOARD_HOST = re.compile(r"""--dashboard-host(?:=|\s+)["']?([^\s"';]+)""")
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
_FARM_STORAGE = re.compile(r"\bFARM_STORAGE=\S")


@dataclass
class ClusterFileReport:
    """The outcome of validating one file: its kind and its problems (empty: valid)."""

    path: Path
    kind: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the file has no problems."""
        return not self.problems


def validate_cluster_file(path: Path) -> list[str]:
    """Return the problems of one cluster file, each ``"<file>: <key.path>: <reason>"``."""
    return check_cluster_file(path).problems


def check_cluster_file(path: Path) -> ClusterFileReport:
    """Read one cluster file, detect its kind and validate it."""
    path = Path(path)
    report = ClusterFileReport(path=path, kind=UNKNOWN)

    def problem(key: str, reason: str) -> None:
        report.problems.append(f"{path}: {key}: {reason}")

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem(TOP, f"cannot read the file ({exc})")
        return report
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else TOP
        reason = getattr(exc, "problem", None) or str(exc)
        problem(where, f"not valid YAML: {reason}")
        return report

    data = documents[0] if len(documents) == 1 else None
    if len(documents) > 1:
        report.kind = MANIFESTS
        _check_manifests(documents, problem)
    elif isinstance(data, dict) and data.get("kind") == "RayCluster":
        report.kind = KUBERAY
        _check_kuberay(data, problem)
    elif isinstance(data, dict) and "provider" in data:
        report.kind = LAUNCHER
        _check_launcher(data, problem)
    else:
        problem(TOP, "not a Ray cluster launcher config (no `provider:`) or a KubeRay RayCluster "
                     "(no `kind: RayCluster`)")
    return report


def _key_path(parts: Any) -> str:
    """``("a", 0, "b")`` -> ``a[0].b``: the path notation used in every problem."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or TOP


def _join(base: str, key: str) -> str:
    return key if base == TOP else f"{base}.{key}"


# --- Ray cluster launcher configs ---------------------------------------------------------

def ray_schema() -> dict[str, Any]:
    """Ray's cluster config schema, read from the installed Ray (the file ``ray up`` uses)."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


#: KubeRay's CRD schemas (v1), vendored with their version and source inside each file.
KUBERAY_CRDS = {kind: Path(__file__).parent / "assets" / f"kuberay-{kind.lower()}-v1.7.0.schema.json.gz"
                for kind in ("RayCluster", "RayJob")}


@functools.lru_cache(maxsize=2)
def kuberay_schema(kind: str = "RayCluster") -> dict[str, Any]:
    """A KubeRay CRD's openAPIV3Schema, made strict as ``kubectl apply`` (strict field
    validation, its default) applies it: an unknown field in an object that lists its
    properties is an error, except where Kubernetes keeps unknown fields."""
    import gzip

    schema = json.loads(gzip.decompress(KUBERAY_CRDS[kind].read_bytes()))["schema"]

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    return schema


def _schema_problems(config: dict[str, Any], problem, schema: dict[str, Any] | None = None,
                     label: str = "Ray's cluster config schema") -> bool:
    """Check ``config`` against ``schema`` (default: Ray's), reporting every error (Ray stops at the first)."""
    import jsonschema

    schema = schema or ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    for error in errors:
        where = _key_path(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            # Name each unknown key in the path rather than quoting jsonschema's sentence.
            known = set(error.schema.get("properties", {}))
            patterns = [re.compile(p) for p in error.schema.get("patternProperties", {})]
            for key in error.instance:
                if key not in known and not any(p.search(key) for p in patterns):
                    problem(_join(where, str(key)), f"unknown key: {label} does not allow it")
            continue
        message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
        problem(where, f"{message} ({label})")
    return bool(errors)


def prepared_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as ``ray up`` sees it: the provider's defaults filled in, setup commands merged.

    The Ray 2.60 wheel ships no defaults file for the fake multi-node provider
    (``fake_multi_node/example.yaml``), so such a file must be complete on its own; it is then
    prepared without defaults.
    """
    from ray.autoscaler._private.util import fill_node_type_min_max_workers, merge_setup_commands, prepare_config

    try:
        # Ray's CLI logger prints a Docker-only warning for file mounts that are files (the
        # token); the farm uses no Docker, so keep it off the validator's output.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return prepare_config(copy.deepcopy(config))
    except FileNotFoundError:
        prepared = copy.deepcopy(config)
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
            prepared.setdefault(key, [])
        merge_setup_commands(prepared)
        fill_node_type_min_max_workers(prepared)
        return prepared


def _ray_checks(config: dict[str, Any], problem) -> Optional[dict[str, Any]]:
    """Ray's own preparation and ``validate_config``; returns the prepared config, or None."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    try:
        prepared = prepared_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        problem(_key_path(exc.absolute_path), f"{exc.message} (Ray's cluster config schema)")
        return None
    except (ValueError, RuntimeError, NotImplementedError, KeyError, AssertionError, TypeError) as exc:
        message = str(exc) or type(exc).__name__
        # Ray's messages name the key they are about; use it as the path where there is one.
        key = next((k for k in ("head_node_type", "max_workers", "provider") if k in message), TOP)
        problem(key, f"{message} (Ray's config validation)")
        return None
    return prepared


def _check_launcher(config: dict[str, Any], problem) -> None:
    if _schema_problems(config, problem):
        return  # the farm's rules below assume Ray's shape
    prepared = _ray_checks(config, problem)
    if prepared is None:
        return
    provider = config["provider"].get("type", "")
    head_type = prepared["head_node_type"]
    node_types: dict[str, Any] = prepared["available_node_types"]

    # Idle GPU nodes must be reclaimed by a deliberate choice, not Ray's default.
    if "idle_timeout_minutes" not in config:
        problem("idle_timeout_minutes", "must be set so idle GPU nodes are terminated (missing)")

    # Scale to zero, with a ceiling, on every worker type.
    has_gpu = False
    for name, node in node_types.items():
        if name == head_type:
            continue
        where = f"available_node_types.{name}"
        min_workers = node.get("min_workers", 0)
        if min_workers != 0:
            problem(f"{where}.min_workers", f"must be 0 so the type scales to zero (got {shown(min_workers)})")
        max_workers = node.get("max_workers", 0)
        if max_workers < 1:
            problem(f"{where}.max_workers",
                    f"must be at least 1 or the autoscaler never launches this type (got {shown(max_workers)})")
        # Declared GPUs win; otherwise Ray autodetects them from the instance type at `ray up`.
        declared = node.get("resources", {}).get("GPU")
        instance = str(node.get("node_config", {}).get("InstanceType", ""))
        if (declared >= 1) if declared is not None else bool(_GPU_INSTANCE.match(instance)):
            has_gpu = True
    if not has_gpu:
        problem("available_node_types", "no worker node type has a GPU: declare `resources: {GPU: n}` or use "
                                        "a GPU instance type (g4dn, g5, g6, p4d, p5...)")

    # Token authentication and a private dashboard. The rules apply to the `ray start` commands
    # the effective config has: a fake_multinode file has none (the test starts the head), while
    # a file that omits the lists gets Ray's defaults, which have neither token nor a private
    # dashboard, and is reported for them.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        origin = "" if key in config else f" (Ray's default for provider {provider}, as the file sets none)"
        for i, command in enumerate(prepared.get(key, [])):
            if not _RAY_START.search(command):
                continue
            if not _TOKEN_MODE.search(command):
                problem(f"{key}[{i}]", "`ray start` without RAY_AUTH_MODE=token: token authentication is off "
                                       f"on these nodes{origin}")
            host = _DASHBOARD_HOST.search(command)
            if key == "head_start_ray_commands" and host and host.group(1) not in _LOCAL_HOSTS:
                problem(f"{key}[{i}]", f"--dashboard-host={host.group(1)} exposes the dashboard and Jobs API; "
                                       f"use 127.0.0.1 and `ray dashboard FILE` (SSH port-forward){origin}")

    # Shared storage for Ray Train checkpoints: the sweep driver runs on the head and hands
    # FARM_STORAGE to Ray Train as storage_path, so the head's commands must set it.
    if provider not in _FAKE_PROVIDERS:
        head_commands = [*prepared.get("initialization_commands", []), *prepared.get("head_setup_commands", []),
                         *prepared.get("head_start_ray_commands", [])]
        if not any(_FARM_STORAGE.search(c) for c in head_commands):
            problem("setup_commands", "FARM_STORAGE is not set on the head node: export it (e.g. in "
                                      "/etc/profile.d/farm.sh) so checkpoints go to shared storage")

    if provider == "aws":
        # A file's head_setup_commands replace Ray's default, which installs boto3 on the head;
        # without it the autoscaler cannot load the AWS provider and no worker ever launches.
        if "head_setup_commands" in config and not any("boto3" in c for c in prepared.get("head_setup_commands", [])):
            problem("head_setup_commands", "replaces Ray's default, which installs boto3 on the head: the "
                                           "autoscaler needs it to launch workers (add a pip install of boto3)")
        # Ray gives its default instance profile to the head only: workers that write
        # checkpoints or adapters to S3 need one of their own.
        commands = " ".join([*prepared.get("setup_commands", []), *prepared.get("worker_setup_commands", [])])
        if "=s3://" in commands:
            for name, node in node_types.items():
                if name != head_type and "IamInstanceProfile" not in node.get("node_config", {}):
                    problem(f"available_node_types.{name}.node_config.IamInstanceProfile",
                            "missing: its workers write to s3:// storage, and Ray gives its default instance "
                            "profile to the head only")


# --- KubeRay RayCluster manifests ---------------------------------------------------------

class _Model(BaseModel):
    # Only the fields the farm relies on are modelled; the rest of the manifest is KubeRay's.
    model_config = ConfigDict(extra="allow")


class EnvVar(_Model):
    """One container env entry."""

    name: str
    value: Optional[str] = None
    valueFrom: Optional[dict[str, Any]] = None


class Resources(_Model):
    """Container resource requests and limits."""

    requests: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)


class Container(_Model):
    """A pod template container."""

    name: str
    image: str
    env: list[EnvVar] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)

    def env_value(self, name: str) -> Optional[str]:
        """The literal value of env var ``name``, ``""`` when it comes from ``valueFrom``, else None."""
        for var in self.env:
            if var.name == name:
                return var.value if var.value is not None else ("" if var.valueFrom else None)
        return None


class PodSpec(_Model):
    """A pod spec: at least one container, the first being Ray's."""

    containers: list[Container] = Field(min_length=1)


class PodTemplate(_Model):
    """A pod template."""

    spec: PodSpec


class HeadGroupSpec(_Model):
    """``spec.headGroupSpec``."""

    rayStartParams: dict[str, Any]
    template: PodTemplate
    serviceType: Optional[str] = None


class WorkerGroupSpec(_Model):
    """One of ``spec.workerGroupSpecs``."""

    groupName: str
    replicas: Optional[StrictInt] = None
    minReplicas: StrictInt = 0      # KubeRay's default
    maxReplicas: Optional[StrictInt] = None  # KubeRay's default is int32 max: no ceiling
    rayStartParams: dict[str, Any] = Field(default_factory=dict)
    template: PodTemplate


class AutoscalerOptions(_Model):
    """``spec.autoscalerOptions``."""

    idleTimeoutSeconds: Optional[StrictInt] = None


class AuthOptions(_Model):
    """``spec.authOptions`` (KubeRay >= 1.5.1)."""

    mode: Optional[str] = None


class RayClusterSpec(_Model):
    """``spec``."""

    rayVersion: Optional[str] = None
    enableInTreeAutoscaling: Optional[StrictBool] = None
    autoscalerOptions: AutoscalerOptions = Field(default_factory=AutoscalerOptions)
    authOptions: Optional[AuthOptions] = None
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = Field(min_length=1)


class RayClusterManifest(_Model):
    """A KubeRay ``RayCluster`` (``ray.io/v1``)."""

    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    spec: RayClusterSpec


def _gpu_count(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _check_kuberay(data: dict[str, Any], problem) -> None:
    if _schema_problems(data, problem, kuberay_schema(), "KubeRay 1.7.0's RayCluster CRD schema"):
        return  # the farm's rules below assume KubeRay's shape
    try:
        manifest = RayClusterManifest.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            problem(_key_path(error["loc"]), error["msg"])
        return
    spec = manifest.spec

    if spec.enableInTreeAutoscaling is not True:
        problem("spec.enableInTreeAutoscaling",
                f"must be true so the Ray autoscaler scales the worker groups (got {shown(spec.enableInTreeAutoscaling)})")
    idle = spec.autoscalerOptions.idleTimeoutSeconds
    if idle is None or idle <= 0:
        problem("spec.autoscalerOptions.idleTimeoutSeconds",
                f"must be a positive number of seconds so idle GPU pods are removed (got {shown(idle)})")

    service = spec.headGroupSpec.serviceType
    if service not in (None, "ClusterIP"):
        problem("spec.headGroupSpec.serviceType",
                f"must be ClusterIP (or absent) so the dashboard / Jobs API stays private; operators use "
                f"`kubectl port-forward` (got {shown(service)})")

    # Token authentication on every container of every Ray pod; the token itself comes from
    # authOptions (KubeRay's generated Secret) or from RAY_AUTH_TOKEN set by hand.
    templates = [("spec.headGroupSpec", spec.headGroupSpec.template)]
    templates += [(f"spec.workerGroupSpecs[{i}]", g.template) for i, g in enumerate(spec.workerGroupSpecs)]
    token_from_operator = spec.authOptions is not None and spec.authOptions.mode == "token"
    if spec.authOptions is not None and spec.authOptions.mode != "token":
        problem("spec.authOptions.mode", f"must be token (got {shown(spec.authOptions.mode)})")
    for where, template in templates:
        for j, container in enumerate(template.spec.containers):
            at = f"{where}.template.spec.containers[{j}].env"
            mode = container.env_value("RAY_AUTH_MODE")
            if mode != "token":
                problem(at, f"RAY_AUTH_MODE=token is missing: token authentication must be on (got {shown(mode)})")
            elif not token_from_operator and container.env_value("RAY_AUTH_TOKEN") is None:
                problem(at, "no token: set spec.authOptions.mode: token or RAY_AUTH_TOKEN from a Secret")

    head = spec.headGroupSpec.template.spec.containers[0]
    if not any(var.name == "FARM_STORAGE" and (var.value or var.valueFrom) for var in head.env):
        problem("spec.headGroupSpec.template.spec.containers[0].env",
                "FARM_STORAGE is not set: the sweep driver needs shared storage for checkpoints")

    has_gpu = False
    for i, group in enumerate(spec.workerGroupSpecs):
        where = f"spec.workerGroupSpecs[{i}]"
        if group.minReplicas != 0:
            problem(f"{where}.minReplicas", f"must be 0 so the group scales to zero (got {shown(group.minReplicas)})")
        if group.maxReplicas is None or group.maxReplicas < 1:
            problem(f"{where}.maxReplicas",
                    f"must be set and at least 1: the group's ceiling (got {shown(group.maxReplicas)})")
        elif group.replicas is not None and group.replicas > group.maxReplicas:
            problem(f"{where}.replicas", f"must not exceed maxReplicas {group.maxReplicas} (got {shown(group.replicas)})")
        if any(_gpu_count(c.resources.limits.get("nvidia.com/gpu")) >= 1 for c in group.template.spec.containers):
            has_gpu = True
            # Ray's KubeRay autoscaler adds no accelerator_type:* resource: a GPU group must
            # advertise its accelerator, or demand naming it never launches the group.
            if "accelerator_type:" not in str(group.rayStartParams.get("resources", "")):
                problem(f"{where}.rayStartParams.resources", "a GPU group must advertise its accelerator "
                        "(for example '\"{\\\"accelerator_type:A10G\\\": 1}\"'): Ray's KubeRay autoscaler adds no "
                        "accelerator_type resource, so demand naming the accelerator is infeasible")
    if not has_gpu:
        problem("spec.workerGroupSpecs", "no worker group requests a GPU (`nvidia.com/gpu` in a container's limits)")


# --- Kubernetes manifests: serving and the service (cluster/serving.yaml) ---------------------

VLLM_APP, GATEWAY_APP = "farm-vllm", "farm-gateway"  # app.kubernetes.io/name of the pods
TRANSFORMERS_APP = "farm-transformers"  # the transformers backend (farm serve --backend transformers)
#: Serving backends: reachable from farm gateway's pods only, through ClusterIP Services.
BACKEND_APPS = {VLLM_APP: "vLLM", TRANSFORMERS_APP: "the transformers backend"}
_APP = "app.kubernetes.io/name"
_SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|SECRET|CATALOG", re.IGNORECASE)


def _pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(key path, pod template) of a workload document (Deployment, StatefulSet, Job)."""
    template = (doc.get("spec") or {}).get("template")
    return [("spec.template", template)] if isinstance(template, dict) else []


def _check_manifests(documents: list[Any], problem) -> None:
    """A multi-document file of Kubernetes objects: KubeRay's CRDs against their schemas, and
    the farm's rules: serving backends (vLLM, transformers) reachable only from the gateway's
    pods, secrets only from Secrets,
    autoscalers that scale something in the file within sane bounds."""
    named: list[tuple[int, str, dict[str, Any]]] = []
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str) or "apiVersion" not in doc \
                or not isinstance((doc.get("metadata") or {}).get("name"), str):
            problem(f"documents[{i}]", "not a Kubernetes object: needs apiVersion, kind and metadata.name")
            continue
        named.append((i, f"documents[{i}] ({doc['kind']} {doc['metadata']['name']})", doc))

    def at(prefix: str):
        return lambda key, reason: problem(f"{prefix}.{key}" if key != TOP else prefix, reason)

    deployments = {doc["metadata"]["name"] for _, _, doc in named if doc["kind"] == "Deployment"}
    backend_pods: set[str] = set()
    for _, where, doc in named:
        kind = doc["kind"]
        if kind == "RayCluster":
            _check_kuberay(doc, at(where))
        elif kind == "RayJob":
            if not _schema_problems(doc, at(where), kuberay_schema("RayJob"), "KubeRay 1.7.0's RayJob CRD schema"):
                spec = doc.get("spec") or {}
                if not spec.get("clusterSelector") and not spec.get("rayClusterSpec"):
                    problem(f"{where}.spec", "names no cluster: set clusterSelector (a running RayCluster) or rayClusterSpec")
        elif kind == "Service":
            selector = (doc.get("spec") or {}).get("selector") or {}
            kind_of = (doc.get("spec") or {}).get("type", "ClusterIP")
            if selector.get(_APP) in BACKEND_APPS and kind_of != "ClusterIP":
                problem(f"{where}.spec.type", f"must be ClusterIP: {BACKEND_APPS[selector[_APP]]} is reached through "
                                              f"farm gateway only (got {shown(kind_of)})")
        elif kind == "HorizontalPodAutoscaler":
            spec = doc.get("spec") or {}
            target = spec.get("scaleTargetRef") or {}
            if target.get("kind") == "Deployment" and target.get("name") not in deployments:
                problem(f"{where}.spec.scaleTargetRef.name", f"no Deployment {shown(target.get('name'))} in this file")
            low, high = spec.get("minReplicas", 1), spec.get("maxReplicas")
            if not isinstance(high, int) or not isinstance(low, int) or not 1 <= low <= high:
                problem(f"{where}.spec", f"needs 1 <= minReplicas <= maxReplicas (got {shown(low)}, {shown(high)})")
        for key, template in _pod_templates(doc):
            labels = (template.get("metadata") or {}).get("labels") or {}
            if labels.get(_APP) in BACKEND_APPS:
                backend_pods.add(labels[_APP])
            for c, container in enumerate((template.get("spec") or {}).get("containers") or []):
                path = f"{where}.{key}.spec.containers[{c}]"
                for e, var in enumerate(container.get("env") or []):
                    if _SECRET_NAME.search(str(var.get("name", ""))) and "value" in var:
                        problem(f"{path}.env[{e}]", f"{var.get('name')} is a secret: take it from a Secret "
                                                    "(valueFrom.secretKeyRef), never a literal value")
                command = [str(part) for part in container.get("command") or []]
                if "serve" in command and "0.0.0.0" in command and "--behind-gateway" not in command:
                    problem(f"{path}.command", "farm serve on 0.0.0.0 without --behind-gateway: it refuses to start")
    for app in sorted(backend_pods):
        guarded = False
        for _, where, doc in named:
            spec = doc.get("spec") or {}
            if doc["kind"] != "NetworkPolicy" or ((spec.get("podSelector") or {}).get("matchLabels") or {}).get(_APP) != app:
                continue
            sources = [source for rule in spec.get("ingress") or [] for source in rule.get("from") or []]
            only_gateway = all(((src.get("podSelector") or {}).get("matchLabels") or {}).get(_APP) == GATEWAY_APP
                               and "ipBlock" not in src for src in sources)
            if "Ingress" in (spec.get("policyTypes") or []) and sources and only_gateway:
                guarded = True
            else:
                problem(f"{where}.spec", f"must admit ingress to {BACKEND_APPS[app]}'s pods from farm gateway's pods only")
        if not guarded:
            problem(TOP, f"{BACKEND_APPS[app]} pods (app.kubernetes.io/name: {app}) need a NetworkPolicy admitting "
                         "ingress from farm gateway's pods only")

