"""Cluster definitions: the repository's files validate, and each broken rule names its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from farm.cluster_files import KUBERAY, LAUNCHER, MANIFESTS, check_cluster_file, validate_cluster_file

from .conftest import REPO

CLUSTER = REPO / "cluster"
CLUSTER_FILES = sorted(CLUSTER.glob("*.yaml"))


def test_the_cluster_definitions_exist():
    names = {path.name for path in CLUSTER_FILES}
    assert {"aws.yaml", "kuberay.yaml", "serving.yaml"} <= names


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_cluster_file_validates(path: Path):
    report = check_cluster_file(path)
    assert report.problems == []
    assert report.kind == {"kuberay.yaml": KUBERAY, "serving.yaml": MANIFESTS}.get(path.name, LAUNCHER)


SERVING = list(yaml.safe_load_all((CLUSTER / "serving.yaml").read_text()))


def _doc(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _index(kind: str, name: str) -> str:
    i = next(i for i, d in enumerate(SERVING) if d["kind"] == kind and d["metadata"]["name"] == name)
    return f"documents[{i}] ({kind} {name})"


def _container(docs: list[dict], name: str) -> dict:
    return _doc(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def _drop(docs: list[dict], kind: str) -> None:
    docs[:] = [d for d in docs if d["kind"] != kind]


@pytest.mark.parametrize("mutate, key, reason", [
    (lambda d: _doc(d, "Service", "farm-vllm-qwen-0-5b")["spec"].update(type="LoadBalancer"),
     f"{_index('Service', 'farm-vllm-qwen-0-5b')}.spec.type", "must be ClusterIP: vLLM is reached through farm gateway only"),
    (lambda d: _drop(d, "NetworkPolicy"), "(top level)", "need a NetworkPolicy admitting ingress from farm gateway's pods only"),
    (lambda d: d.remove(_doc(d, "NetworkPolicy", "farm-transformers-only-from-gateway")), "(top level)",
     "the transformers backend pods (app.kubernetes.io/name: farm-transformers) need a NetworkPolicy"),
    (lambda d: _doc(d, "Service", "farm-transformers-qwen-0-5b")["spec"].update(type="NodePort"),
     f"{_index('Service', 'farm-transformers-qwen-0-5b')}.spec.type",
     "must be ClusterIP: the transformers backend is reached through farm gateway only"),
    (lambda d: _doc(d, "NetworkPolicy", "farm-vllm-only-from-gateway")["spec"]["ingress"][0]["from"].append(
        {"ipBlock": {"cidr": "0.0.0.0/0"}}),
     f"{_index('NetworkPolicy', 'farm-vllm-only-from-gateway')}.spec", "from farm gateway's pods only"),
    (lambda d: _container(d, "farm-gateway")["env"].__setitem__(0, {"name": "FARM_VLLM_API_KEY", "value": "hunter2"}),
     f"{_index('Deployment', 'farm-gateway')}.spec.template.spec.containers[0].env[0]", "is a secret: take it from a Secret"),
    (lambda d: _container(d, "farm-vllm-qwen-0-5b")["command"].remove("--behind-gateway"),
     f"{_index('Deployment', 'farm-vllm-qwen-0-5b')}.spec.template.spec.containers[0].command", "without --behind-gateway"),
    (lambda d: _doc(d, "HorizontalPodAutoscaler", "farm-gateway")["spec"]["scaleTargetRef"].update(name="nope"),
     f"{_index('HorizontalPodAutoscaler', 'farm-gateway')}.spec.scaleTargetRef.name", 'no Deployment "nope" in this file'),
    (lambda d: _doc(d, "HorizontalPodAutoscaler", "farm-gateway")["spec"].update(minReplicas=11),
     f"{_index('HorizontalPodAutoscaler', 'farm-gateway')}.spec", "needs 1 <= minReplicas <= maxReplicas"),
    (lambda d: _doc(d, "RayJob", "farm-service")["spec"].update(entrypointt="x"),
     f"{_index('RayJob', 'farm-service')}.spec.entrypointt", "unknown key: KubeRay 1.7.0's RayJob CRD schema"),
    (lambda d: _doc(d, "RayJob", "farm-service")["spec"].pop("clusterSelector"),
     f"{_index('RayJob', 'farm-service')}.spec", "names no cluster"),
], ids=["vllm-exposed", "no-network-policy", "no-transformers-policy", "transformers-exposed", "policy-admits-the-world", "literal-secret", "not-behind-gateway",
        "hpa-target", "hpa-bounds", "rayjob-unknown-key", "rayjob-no-cluster"])
def test_broken_serving_manifests_name_the_document_and_key(tmp_path, mutate, key, reason):
    docs = [dict(d) for d in yaml.safe_load_all((CLUSTER / "serving.yaml").read_text())]
    mutate(docs)
    path = tmp_path / "serving.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    problems = validate_cluster_file(path)
    expected = f"{path}: {key}: "
    assert any(p.startswith(expected) and reason in p for p in problems), problems


def _broken(tmp_path: Path, name: str, mutate: Callable[[dict[str, Any]], None]) -> list[str]:
    """Load cluster/<name>, apply one mutation, write the copy and validate it."""
    config = yaml.safe_load((CLUSTER / name).read_text())
    mutate(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return validate_cluster_file(path)


def _worker_start(config: dict[str, Any]) -> None:
    config["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "")
                                           for c in config["worker_start_ray_commands"]]


def _public_dashboard(config: dict[str, Any]) -> None:
    config["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
                                         for c in config["head_start_ray_commands"]]


def _ray_start_index(config: dict[str, Any], key: str) -> int:
    return next(i for i, c in enumerate(config[key]) if "ray start" in c)


AWS = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
HEAD_START = _ray_start_index(AWS, "head_start_ray_commands")
WORKER_START = _ray_start_index(AWS, "worker_start_ray_commands")


@pytest.mark.parametrize("mutate, key, reason", [
    (lambda c: c["available_node_types"]["gpu_a10g"].update(min_workers=1),
     "available_node_types.gpu_a10g.min_workers", "must be 0 so the type scales to zero (got 1)"),
    (lambda c: c["available_node_types"]["gpu_2nd_l4"].update(max_workers=0),
     "available_node_types.gpu_2nd_l4.max_workers", "must be at least 1"),
    (_worker_start, f"worker_start_ray_commands[{WORKER_START}]", "without RAY_AUTH_MODE=token"),
    (_public_dashboard, f"head_start_ray_commands[{HEAD_START}]", "--dashboard-host=0.0.0.0 exposes the dashboard"),
    (lambda c: c.update(head_typo="x"), "head_typo", "unknown key: Ray's cluster config schema does not allow it"),
    (lambda c: c["available_node_types"]["gpu_a10g"].update(min_workers="zero"),
     "available_node_types.gpu_a10g.min_workers", "'zero' is not of type 'integer'"),
    (lambda c: c.pop("idle_timeout_minutes"), "idle_timeout_minutes", "must be set"),
    (lambda c: c.update(setup_commands=[s for s in c["setup_commands"] if "FARM_STORAGE" not in s]),
     "setup_commands", "FARM_STORAGE is not set on the head node"),
    (lambda c: [c["available_node_types"].pop(t) for t in ("gpu_a10g", "gpu_2nd_l4")],
     "available_node_types", "no worker node type has a GPU"),
    # Without start commands, Ray's defaults apply: no token, dashboard on 0.0.0.0.
    (lambda c: c.pop("head_start_ray_commands"), "head_start_ray_commands[1]", "Ray's default for provider aws"),
    (lambda c: c.update(head_node_type="nope"), "head_node_type", "must be one of `available_node_types`"),
    (lambda c: c.update(head_setup_commands=[]), "head_setup_commands", "installs boto3 on the head"),
    (lambda c: c["available_node_types"]["gpu_2nd_l4"]["node_config"].pop("IamInstanceProfile"),
     "available_node_types.gpu_2nd_l4.node_config.IamInstanceProfile", "Ray gives its default instance profile to the head only"),
], ids=["min-workers", "max-workers", "worker-token", "dashboard-host", "unknown-key", "schema-type",
        "idle-timeout", "storage", "no-gpu", "default-start-commands", "head-node-type", "no-boto3", "worker-profile"])
def test_broken_launcher_config_names_the_key(tmp_path, mutate, key, reason):
    problems = _broken(tmp_path, "aws.yaml", mutate)
    expected = f"{tmp_path / 'aws.yaml'}: {key}: "
    assert any(p.startswith(expected) and reason in p for p in problems), problems


def test_fake_multinode_needs_no_storage_but_keeps_the_scaling_rules(tmp_path):
    assert _broken(tmp_path, "local-fake.yaml", lambda c: None) == []
    problems = _broken(tmp_path, "local-fake.yaml",
                       lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=2))
    assert problems == [f"{tmp_path / 'local-fake.yaml'}: available_node_types.gpu_worker.min_workers: "
                        "must be 0 so the type scales to zero (got 2)"]
    # Logical GPUs are how a fake worker type has a GPU.
    problems = _broken(tmp_path, "local-fake.yaml",
                       lambda c: c["available_node_types"]["gpu_worker"]["resources"].pop("GPU"))
    assert any(": available_node_types: no worker node type has a GPU" in p for p in problems), problems


def _group(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in config["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def _env(container: dict[str, Any]) -> list[dict[str, Any]]:
    return container["env"]


def _drop_worker_auth(config: dict[str, Any]) -> None:
    container = _group(config, "gpu-a10g")["template"]["spec"]["containers"][0]
    container["env"] = [e for e in _env(container) if e["name"] != "RAY_AUTH_MODE"]


def _drop_head_storage(config: dict[str, Any]) -> None:
    container = config["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in _env(container) if e["name"] != "FARM_STORAGE"]


def _no_gpu(config: dict[str, Any]) -> None:
    for group in config["spec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            for section in ("limits", "requests"):
                container.get("resources", {}).get(section, {}).pop("nvidia.com/gpu", None)


KUBE = yaml.safe_load((CLUSTER / "kuberay.yaml").read_text())
GPU_GROUP = next(i for i, g in enumerate(KUBE["spec"]["workerGroupSpecs"]) if g["groupName"] == "gpu-a10g")


@pytest.mark.parametrize("mutate, key, reason", [
    (lambda c: _group(c, "gpu-a10g").update(minReplicas=1),
     f"spec.workerGroupSpecs[{GPU_GROUP}].minReplicas", "must be 0 so the group scales to zero (got 1)"),
    (lambda c: _group(c, "gpu-a10g").update(replicas=9),
     f"spec.workerGroupSpecs[{GPU_GROUP}].replicas", "must not exceed maxReplicas 8 (got 9)"),
    (lambda c: _group(c, "gpu-a10g").pop("maxReplicas"),  # KubeRay's own CRD requires it
     f"spec.workerGroupSpecs[{GPU_GROUP}]", "'maxReplicas' is a required property (KubeRay 1.7.0's RayCluster CRD schema)"),
    (lambda c: _group(c, "gpu-a10g").update(maxReplicas=0),
     f"spec.workerGroupSpecs[{GPU_GROUP}].maxReplicas", "must be set and at least 1"),
    (lambda c: _group(c, "gpu-a10g").update(minReplica=0),  # a typo: kubectl apply's strict validation refuses it
     f"spec.workerGroupSpecs[{GPU_GROUP}].minReplica", "unknown key: KubeRay 1.7.0's RayCluster CRD schema does not allow it"),
    (lambda c: _group(c, "gpu-a10g")["template"]["spec"].update(nodeSelectr={}),
     f"spec.workerGroupSpecs[{GPU_GROUP}].template.spec.nodeSelectr", "unknown key"),
    (lambda c: _group(c, "gpu-a10g").update(maxReplicas="eight"),
     f"spec.workerGroupSpecs[{GPU_GROUP}].maxReplicas", "'eight' is not of type 'integer'"),
    (lambda c: c["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
     "spec.headGroupSpec.serviceType", "must be ClusterIP (or absent) so the dashboard / Jobs API stays private"),
    (lambda c: c["spec"].pop("enableInTreeAutoscaling"),
     "spec.enableInTreeAutoscaling", "must be true so the Ray autoscaler scales the worker groups (got null)"),
    (lambda c: c["spec"]["autoscalerOptions"].update(idleTimeoutSeconds=0),
     "spec.autoscalerOptions.idleTimeoutSeconds", "must be a positive number of seconds"),
    (_drop_worker_auth, f"spec.workerGroupSpecs[{GPU_GROUP}].template.spec.containers[0].env",
     "RAY_AUTH_MODE=token is missing"),
    (_drop_head_storage, "spec.headGroupSpec.template.spec.containers[0].env", "FARM_STORAGE is not set"),
    (_no_gpu, "spec.workerGroupSpecs", "no worker group requests a GPU"),
    (lambda c: c.update(apiVersion="ray.io/v1alpha1"), "apiVersion", "Input should be 'ray.io/v1'"),
    (lambda c: c["spec"]["headGroupSpec"].pop("rayStartParams"), "spec.headGroupSpec.rayStartParams",
     "Field required"),
    (lambda c: _group(c, "gpu-a10g").update(rayStartParams={}), f"spec.workerGroupSpecs[{GPU_GROUP}].rayStartParams.resources",
     "a GPU group must advertise its accelerator"),
], ids=["min-replicas", "replicas", "max-replicas-missing", "max-replicas-zero", "crd-unknown-key",
        "crd-unknown-pod-key", "crd-type", "service-type", "autoscaling", "idle-timeout",
        "worker-token", "storage", "no-gpu", "api-version", "ray-start-params", "no-accelerator"])
def test_broken_kuberay_manifest_names_the_key(tmp_path, mutate, key, reason):
    problems = _broken(tmp_path, "kuberay.yaml", mutate)
    expected = f"{tmp_path / 'kuberay.yaml'}: {key}: "
    assert any(p.startswith(expected) and reason in p for p in problems), problems


def test_unreadable_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\nprovider:\n  type: aws\n   region: us-west-2\n")
    [problem] = validate_cluster_file(bad)
    assert problem.startswith(f"{bad}: line 4, column ") and "not valid YAML" in problem
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\n")
    assert validate_cluster_file(other) == [
        f"{other}: (top level): not a Ray cluster launcher config (no `provider:`) or a KubeRay RayCluster "
        "(no `kind: RayCluster`)"]


# --- the CLI ------------------------------------------------------------------------------

@pytest.fixture
def run_cli(monkeypatch):
    from typer.testing import CliRunner

    from farm import cli

    # A wide console so table cells do not wrap problems over lines.
    monkeypatch.setattr(cli.console, "width", 400)

    def run(*args: str):
        return CliRunner().invoke(cli.app, ["cluster", "validate", *args])
    return run


def test_cli_accepts_the_repository_files(run_cli):
    result = run_cli(*map(str, CLUSTER_FILES))
    assert result.exit_code == 0, result.output
    for path in CLUSTER_FILES:
        assert str(path) in result.output
    assert "kuberay" in result.output and "ray launcher" in result.output


def test_cli_fails_on_a_broken_copy(tmp_path, run_cli):
    _broken(tmp_path, "kuberay.yaml", lambda c: _group(c, "gpu-a10g").update(minReplicas=1))
    result = run_cli(str(CLUSTER / "aws.yaml"), str(tmp_path / "kuberay.yaml"))
    assert result.exit_code == 1, result.output
    assert (f"spec.workerGroupSpecs[{GPU_GROUP}].minReplicas: must be 0 so the group scales to zero (got 1)"
            in result.output)


def test_cli_names_the_line_of_a_yaml_error(tmp_path, run_cli):
    bad = tmp_path / "notes.yaml"
    bad.write_text("cluster_name: x\nprovider: [aws\n")
    result = run_cli(str(bad))
    assert result.exit_code == 1, result.output
    assert "line 3" in result.output and "not valid YAML" in result.output
