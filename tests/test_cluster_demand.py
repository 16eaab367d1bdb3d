"""The sweep's demand against the cluster files, through Ray's own autoscaler code.

``cluster/kuberay.yaml`` is converted by Ray's KubeRay autoscaling-config code (what the head's
autoscaler sidecar runs); ``cluster/aws.yaml`` is prepared as ``ray up`` prepares it and its
node types' resources are filled by Ray's AWS provider from the instance types (the EC2 API
answer comes from a fixture of AWS's published vCPU, memory and GPU counts: EC2 cannot be
reached here). The farm's own trainer requests (``farm.trainers.trainer_resources``) then go
through Ray's resource demand scheduler, which says which node types it would launch and which
bundles it could never place.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from farm.cluster_files import prepared_config
from farm.spec import ResourceSpec
from farm.trainers import trainer_resources

from .conftest import REPO

CLUSTER = REPO / "cluster"

# AWS's published figures (describe-instance-types), in the EC2 API's shape.
EC2_INSTANCE_TYPES = [
    {"InstanceType": "g5.2xlarge", "VCpuInfo": {"DefaultVCpus": 8}, "MemoryInfo": {"SizeInMiB": 32768},
     "GpuInfo": {"Gpus": [{"Name": "A10G", "Manufacturer": "NVIDIA", "Count": 1, "MemoryInfo": {"SizeInMiB": 24576}}]}},
    {"InstanceType": "g6.2xlarge", "VCpuInfo": {"DefaultVCpus": 8}, "MemoryInfo": {"SizeInMiB": 32768},
     "GpuInfo": {"Gpus": [{"Name": "L4", "Manufacturer": "NVIDIA", "Count": 1, "MemoryInfo": {"SizeInMiB": 22888}}]}},
    {"InstanceType": "m6i.2xlarge", "VCpuInfo": {"DefaultVCpus": 8}, "MemoryInfo": {"SizeInMiB": 32768}},
]


def kuberay_node_types() -> dict:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    manifest = yaml.safe_load((CLUSTER / "kuberay.yaml").read_text())
    manifest["metadata"]["namespace"] = "default"  # the API server fills it in
    return _derive_autoscaling_config_from_ray_cr(manifest)


def aws_node_types(monkeypatch) -> dict:
    import ray.autoscaler._private.aws.node_provider as aws

    monkeypatch.setattr(aws, "list_ec2_instances", lambda region, credentials=None: EC2_INSTANCE_TYPES)
    prepared = prepared_config(yaml.safe_load((CLUSTER / "aws.yaml").read_text()))
    return aws.AWSNodeProvider.fillout_available_node_types_resources(prepared)


def launches(config: dict, demand: list[dict]) -> tuple[dict, list]:
    """(node type -> count to launch, infeasible bundles) for ``demand`` on a cluster that has
    only its head running: Ray's resource demand scheduler decides."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler
    from ray.autoscaler.node_provider import NodeProvider
    from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

    head_type = config["head_node_type"]

    class HeadOnly(NodeProvider):
        def __init__(self):
            super().__init__({}, "test")

        def non_terminated_nodes(self, tag_filters):
            return ["head"]

        def node_tags(self, node_id):
            return {TAG_RAY_USER_NODE_TYPE: head_type, TAG_RAY_NODE_KIND: NODE_KIND_HEAD}

        def internal_ip(self, node_id):
            return "10.0.0.1"

    types = config["available_node_types"]
    scheduler = ResourceDemandScheduler(HeadOnly(), types, config["max_workers"], head_type,
                                        config.get("upscaling_speed", 1.0))
    head = dict(types[head_type]["resources"])
    to_launch, infeasible = scheduler.get_nodes_to_launch(
        ["head"], {}, copy.deepcopy(demand), {"10.0.0.1": dict(head)}, [], {"10.0.0.1": head}, [],
        NodeAvailabilitySummary({}))
    return dict(to_launch), infeasible


def demand(**resources) -> list[dict]:
    """The worker bundles one trainer asks for, as the farm builds them."""
    return trainer_resources(ResourceSpec(**resources)).demand()


A10G_TENANT = demand(cpus_per_worker=4, gpus_per_worker=1, accelerator_type="A10G")
PACK = [b for _ in range(4) for b in demand(cpus_per_worker=1, gpus_per_worker=0.25, accelerator_type="A10G")]
BASELINE = demand(workers=2, cpus_per_worker=4, gpus_per_worker=1, accelerator_type="A10G")
CPU_TENANTS = [b for _ in range(4) for b in demand(cpus_per_worker=4, gpus_per_worker=0)]


@pytest.fixture(params=["kuberay", "aws"])
def cluster(request, monkeypatch):
    if request.param == "kuberay":
        return request.param, kuberay_node_types(), "gpu-a10g", "cpu"
    return request.param, aws_node_types(monkeypatch), "gpu_a10g", "cpu"


def test_gpu_groups_advertise_their_accelerator_as_ray_converts_them(cluster):
    _, config, gpu, cpu = cluster
    types = config["available_node_types"]
    assert types[gpu]["resources"]["GPU"] == 1 and types[gpu]["resources"]["accelerator_type:A10G"] == 1
    assert types[gpu]["min_workers"] == 0 and types[cpu]["min_workers"] == 0
    assert "GPU" not in types[cpu]["resources"] or types[cpu]["resources"]["GPU"] == 0


def test_the_sweeps_demand_launches_the_expected_groups_from_zero(cluster):
    name, config, gpu, cpu = cluster
    # an A10G tenant (one node), a pack of four quarter-GPU tenants (one node), a 2-worker baseline (two nodes)
    to_launch, infeasible = launches(config, A10G_TENANT + PACK + BASELINE)
    assert infeasible == [] and to_launch == {gpu: 4}, (name, to_launch, infeasible)
    # CPU tenants take CPU nodes (after the head's CPUs on AWS; KubeRay's head has none), never GPU ones
    to_launch, infeasible = launches(config, CPU_TENANTS)
    assert infeasible == [] and to_launch == {cpu: 4 if name == "kuberay" else 1}, (name, to_launch, infeasible)


def test_without_the_advertised_accelerator_kuberay_demand_is_infeasible(monkeypatch):
    """What the manifest's rayStartParams.resources fixes: Ray's conversion alone gives the GPU
    group no accelerator_type resource, and nothing launches."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    manifest = yaml.safe_load((CLUSTER / "kuberay.yaml").read_text())
    manifest["metadata"]["namespace"] = "default"
    for group in manifest["spec"]["workerGroupSpecs"]:
        group["rayStartParams"].pop("resources", None)
    to_launch, infeasible = launches(_derive_autoscaling_config_from_ray_cr(manifest), A10G_TENANT)
    assert to_launch == {} and infeasible == A10G_TENANT


def test_aws_gpu_demand_without_an_accelerator_takes_a10g_first(monkeypatch):
    """The stated pool order: gpu_a10g first (Ray breaks the tie by name, last first); gpu_2nd_l4
    for what one round's launch limit (at least 5 nodes a type) leaves, or demand naming L4."""
    config = aws_node_types(monkeypatch)
    def any_gpu(count):
        return [b for _ in range(count) for b in demand(cpus_per_worker=4, gpus_per_worker=1)]

    assert launches(config, any_gpu(4)) == ({"gpu_a10g": 4}, [])
    to_launch, infeasible = launches(config, any_gpu(10))
    assert infeasible == [] and to_launch == {"gpu_a10g": 5, "gpu_2nd_l4": 2}, to_launch
    l4_only = demand(cpus_per_worker=4, gpus_per_worker=1, accelerator_type="L4")
    assert launches(config, l4_only) == ({"gpu_2nd_l4": 1}, [])


def test_the_cluster_walk_throughs_spec_asks_for_one_a10g_node(cluster):
    """jobs/configs/gpu-cluster.yaml (what the README submits to a cluster): four quarter-GPU
    LoRA tenants that name A10G fit on one gpu_a10g node; nothing else launches."""
    from farm.spec import load_spec

    name, config, gpu, _ = cluster
    sweep = load_spec(REPO / "jobs" / "configs" / "gpu-cluster.yaml")
    bundles = [b for _ in sweep.jobs for b in trainer_resources(sweep.spec.resources).demand()]
    assert len(bundles) == 4 and all(b["accelerator_type:A10G"] > 0 for b in bundles)
    assert launches(config, bundles) == ({gpu: 1}, []), name


def test_auto_gpus_plan_for_what_the_autoscaler_can_add_when_none_is_up():
    from farm.sizing import launchable_gpus

    auto = ResourceSpec(gpus_per_worker="auto")
    assert launchable_gpus(auto, {}) is None  # no GPU can come: plan for CPUs
    assert launchable_gpus(auto, {"FARM_GPU_NODES": "A10G:8,L4:2"}) == ("A10G", 8)
    named = ResourceSpec(gpus_per_worker="auto", accelerator_type="L4")
    assert launchable_gpus(named, {"FARM_GPU_NODES": "A10G:8,L4:2"}) == ("L4", 2)
    assert launchable_gpus(named, {"FARM_GPU_NODES": "A10G:8"}) is None  # this cluster cannot add an L4
    assert launchable_gpus(named, {}) == ("L4", 1)  # the spec says a GPU will be there
    assert launchable_gpus(auto, {"FARM_GPU_NODES": "junk, :3,A10G:x"}) is None


def test_an_auto_tenant_on_a_cluster_scaled_to_zero_asks_for_a_gpu_node(local_ray, monkeypatch, base_model_dir):
    """The local Ray here has no GPU, like a GPU cluster scaled to zero; with FARM_GPU_NODES
    (what both cluster files export) the planner sizes for A10Gs and the trainer's demand
    launches a gpu_a10g node through Ray's scheduler against cluster/aws.yaml."""
    from farm.sizing import cluster_capacity, size_adapter
    from farm.spec import parse_spec

    monkeypatch.setenv("FARM_GPU_NODES", "A10G:8,L4:2")
    sweep = parse_spec({"name": "z", "base_model": {"name_or_path": str(base_model_dir)},
                        "resources": {"gpus_per_worker": "auto", "accelerator_type": "A10G"},
                        "tenants": [{"name": "acme", "data": {"path": str(REPO / "jobs/data/acme.jsonl")}}]})
    capacity = cluster_capacity(sweep.spec.resources)
    assert (capacity.kind, capacity.device_bytes, capacity.devices) == ("gpu", 24 * 2**30, 8), capacity
    sized = size_adapter(sweep.job("acme"), sweep.spec.resources, capacity).resources
    assert 0 < sized.gpus_per_worker <= 1  # a share of one A10G, not the head's CPUs
    assert launches(aws_node_types(monkeypatch), trainer_resources(sized).demand()) == ({"gpu_a10g": 1}, [])
    monkeypatch.delenv("FARM_GPU_NODES")
    unnamed = sweep.spec.resources.model_copy(update={"accelerator_type": None})
    assert cluster_capacity(unnamed).kind == "cpu"  # nothing says a GPU can come


def test_both_cluster_files_export_the_gpu_types_their_autoscaler_can_add(monkeypatch):
    """FARM_GPU_NODES in each file names exactly its GPU node types and their ceilings."""
    import re

    aws_text = (CLUSTER / "aws.yaml").read_text()
    aws = dict(entry.split(":") for entry in re.search(r"FARM_GPU_NODES=(\S+)", aws_text).group(1).split(","))
    types = aws_node_types(monkeypatch)["available_node_types"]
    gpu_types = {next(k.split(":", 1)[1] for k in t["resources"] if k.startswith("accelerator_type:")): t["max_workers"]
                 for t in types.values() if t["resources"].get("GPU")}
    assert {k: int(v) for k, v in aws.items()} == gpu_types == {"A10G": 8, "L4": 2}
    manifest = yaml.safe_load((CLUSTER / "kuberay.yaml").read_text())
    env = {e["name"]: e.get("value") for e in manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    groups = {g["groupName"]: g["maxReplicas"] for g in manifest["spec"]["workerGroupSpecs"]}
    assert env["FARM_GPU_NODES"] == f"A10G:{groups['gpu-a10g']}"


def test_a_pack_asks_for_its_own_share_of_a_gpu_not_its_first_tenants(local_ray, monkeypatch):
    """A co-training pack holds several adapters on one base: its GPU share comes from its own
    plan (``slots`` adapters), so a pack needing 10 GB of a 24 GB A10G asks for half of one,
    whatever its first tenant alone asked for."""
    from farm.sizing import Pack
    from farm.sweep import _pack_resources

    single = trainer_resources(ResourceSpec(cpus_per_worker=1, gpus_per_worker=0.125, accelerator_type="A10G"))
    pack = Pack("pack-1", ("a", "b", "c"), slots=3, planned_bytes=10 * 2**30, note="")
    jobs = []  # no memory resource on GPUs: the jobs' data settings are not read
    asked = _pack_resources(single, pack, 1, jobs, device_bytes=24 * 2**30)
    assert asked.resources_per_worker["GPU"] == 0.5
    assert _pack_resources(single, pack, 1, jobs, device_bytes=None).resources_per_worker["GPU"] == 1.0
    assert launches(aws_node_types(monkeypatch), asked.demand() * 2) == ({"gpu_a10g": 1}, [])  # two packs, one A10G
