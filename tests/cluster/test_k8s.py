"""Kubernetes manifests (cluster/k8s): rendered for several sizes and validated offline, custom
resources against the strict JSON schemas in ../shared/k8s-schemas (unknown fields are errors),
built-in kinds with kubernetes-validate --strict. A misspelt field fails."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import yaml

from tests.cluster.common import REPO, SHARED, tool

import jsonschema  # test dependencies: missing means a broken install, which must fail
import kubernetes_validate

SCHEMAS = SHARED / "k8s-schemas"
K8S_VERSION = "1.32.0"
K8S_DIR = REPO / "cluster" / "k8s"

spec = importlib.util.spec_from_file_location("k8s_render", K8S_DIR / "render.py")
render_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_module)


@pytest.fixture(scope="module")
def validators() -> dict:
    if not SCHEMAS.is_dir():
        message = f"no custom resource schemas at {SCHEMAS}: the CRD checks did not run (CI provides ../shared)"
        if os.environ.get("PRETRAIN_REQUIRE_SHARED") == "1":
            pytest.fail(message, pytrace=False)
        warnings.warn(message)
        pytest.skip(message)
    out = {}
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        key = (schema["properties"]["apiVersion"]["const"], schema["properties"]["kind"]["const"])
        out[key] = jsonschema.Draft7Validator(schema)
    return out


def errors(doc: dict, validators: dict) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in validators:
        return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validators[key].iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key}"]
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def command_of(doc: dict) -> list[str]:
    if doc["kind"] == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    return doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["command"]


def test_committed_examples_are_the_renderer_defaults(tmp_path):
    render_module.main(["--examples", str(tmp_path)])
    for name in render_module.EXAMPLES:
        assert (K8S_DIR / name).read_text() == (tmp_path / name).read_text(), \
            f"{name} is stale: python cluster/k8s/render.py --examples cluster/k8s"


def test_committed_examples_validate(validators):
    kinds = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert errors(doc, validators) == [], path.name
            kinds.append(doc["kind"])
    assert sorted(kinds) == ["JobSet", "PersistentVolumeClaim", "PersistentVolumeClaim", "PyTorchJob", "Service"]


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
@pytest.mark.parametrize("nodes, gpus", [(1, 1), (4, 8), (32, 8)])
def test_every_size_validates_and_runs_torchrun_on_all_gpus(validators, kind, nodes, gpus):
    docs = render_module.render(kind, name="llama", nodes=nodes, gpus_per_node=gpus, rdma=True,
                                extra_resources=["rdma/ib=1"], env=["NCCL_IB_HCA=mlx5"], namespace="ml",
                                overrides=["optim.lr=3e-4"])
    for doc in docs:
        assert errors(doc, validators) == [], doc["kind"]
    job = docs[-1]
    command = command_of(job)
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    assert command[-3:] == ["run.dir=/checkpoints/llama", "data.paths=[/data/shards]", "optim.lr=3e-4"]
    if kind == "pytorchjob":
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert sum(r["replicas"] for r in replicas.values()) == nodes
        assert job["spec"]["nprocPerNode"] == str(gpus)
        assert "--node-rank=$(PET_NODE_RANK)" in command and "--master-addr=$(MASTER_ADDR)" in command
    else:
        service, jobset = docs
        assert service["spec"]["clusterIP"] == "None"
        assert jobset["spec"]["network"]["subdomain"] == service["metadata"]["name"] == "llama"
        job_spec = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert job_spec["parallelism"] == job_spec["completions"] == nodes
        assert f"--nnodes={nodes}" in command and f"--nproc-per-node={gpus}" in command
        assert "--master-addr=llama-node-0-0.llama" in command


def misspell(doc: dict, path: list, wrong: str) -> dict:
    """A copy of ``doc`` with the key at ``path`` renamed to ``wrong``."""
    bad = copy.deepcopy(doc)
    parent = bad
    for key in path[:-1]:
        parent = parent[key]
    parent[wrong] = parent.pop(path[-1])
    return bad


CONTAINER = ["template", "spec", "containers", 0]


@pytest.mark.parametrize("kind, index, path, wrong", [
    ("pytorchjob", 0, ["spec", "pytorchReplicaSpecs", "Master", *CONTAINER, "imagePullPolicy"], "imagePulPolicy"),
    ("pytorchjob", 0, ["spec", "runPolicy"], "runPolicies"),
    ("jobset", 1, ["spec", "replicatedJobs", 0, "template", "spec", *CONTAINER, "volumeMounts"], "volumeMount"),
    ("jobset", 1, ["spec", "failurePolicy", "maxRestarts"], "maxRestart"),
    ("jobset", 0, ["spec", "publishNotReadyAddresses"], "publishNotReadyAddress"),
    ("volumes", 0, ["spec", "accessModes"], "accesModes"),
])
def test_a_misspelt_field_fails_validation(validators, kind, index, path, wrong):
    doc = render_module.render(kind)[index]
    assert errors(doc, validators) == []
    problems = errors(misspell(doc, path, wrong), validators)
    assert problems and any(wrong in p for p in problems), problems


def test_the_command_line_renders_yaml(validators):
    out = subprocess.run([sys.executable, str(K8S_DIR / "render.py"), "jobset", "--nodes", "3", "--name", "x",
                          "--node-selector", "gpu=h100", "--toleration", "dedicated"],
                         capture_output=True, text=True, check=True).stdout
    service, jobset = yaml.safe_load_all(out)
    pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert [t["key"] for t in pod["tolerations"]] == ["dedicated"]
    assert errors(jobset, validators) == [] and errors(service, validators) == []


def test_check_jsonschema_rejects_a_misspelt_pytorchjob(validators, tmp_path):
    """The same strictness through the check-jsonschema command line (single-document files)."""
    check = tool("check-jsonschema")
    assert check is not None, "check-jsonschema is a test dependency: pip install -e '.[test]'"
    schema = SCHEMAS / "kubeflow.org_pytorchjob_v1.json"
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(render_module.render("pytorchjob")[0]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(misspell(render_module.render("pytorchjob")[0], ["spec", "nprocPerNode"],
                                           "nProcPerNode")))
    assert subprocess.run([check, "--schemafile", str(schema), str(good)], capture_output=True).returncode == 0
    result = subprocess.run([check, "--schemafile", str(schema), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "nProcPerNode" in result.stdout + result.stderr
