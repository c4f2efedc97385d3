"""deploy/: every manifest parses and validates against its schema offline; commands are valid facepq CLIs.

Kubernetes objects are checked with kubernetes-validate (the JSON schemas ship inside the
wheel, so nothing is fetched); the KubeRay RayJob (a CRD, no schema there) is checked for
the structure the operator needs and its pod templates against the core PodTemplate schema.
Docker does not run here, so the Dockerfile and the compose file are checked as text/YAML.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from facepq.cli import build_parser

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # grpc probes are GA since 1.27

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the dev extra: pip install -e '.[dev]'")


def k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_docs() if d.get("kind") == kind]


def parse_cli(argv: list[str]):
    """The real facepq parser: raises SystemExit on an unknown option or a missing required one."""
    return build_parser().parse_args(argv)


# ---- Kubernetes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,doc", [(n, d) for n, d in k8s_docs()
                                      if d.get("kind") not in ("RayJob", "Kustomization")],
                         ids=lambda v: v if isinstance(v, str) else v.get("kind", "?"))
def test_every_kubernetes_object_validates_against_its_strict_schema(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_object():
    """Guards the test above against a validator that accepts anything."""
    sts = dict(by_kind("StatefulSet")[0])
    sts["spec"] = dict(sts["spec"], replicas="four", shardz=1)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


def test_rayjob_has_the_structure_kuberay_needs_and_valid_pod_templates():
    (job,) = by_kind("RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"] == ray.__version__, "the RayJob's rayVersion must match the image's Ray"
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    assert len(groups) >= 2
    for name, group in groups:
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams values are strings"
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                    "template": group["template"]}
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        assert group["template"]["spec"]["containers"][0]["image"] == "facepq"
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # the entrypoint is a valid `facepq ingest` command (RAY_ADDRESS is set by KubeRay)
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "facepq"
    args = parse_cli(argv[1:])
    assert args.command == "ingest" and args.index == "/index" and args.shards >= 1
    # photos and the model at the same paths on every Ray pod
    for _, group in groups:
        mounts = {m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c["volumeMounts"]}
        assert {"/models", "/data"} <= mounts


def test_kustomization_lists_every_serving_manifest_and_they_exist():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["apiVersion"].startswith("kustomize.config.k8s.io/") and kust["kind"] == "Kustomization"
    listed = set(kust["resources"])
    for name in listed:
        assert (K8S / name).is_file(), name
    on_demand = {"ingest-rayjob.yaml", "kustomization.yaml"}
    assert listed == {p.name for p in K8S.glob("*.yaml")} - on_demand
    assert any(i["name"] == "facepq" for i in kust["images"])


def _grpc_containers():
    for kind in ("StatefulSet", "Deployment"):
        for obj in by_kind(kind):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                if c["image"] == "facepq":
                    yield obj, c


def test_facepq_pods_have_grpc_readiness_and_liveness_probes_on_their_grpc_port():
    seen = 0
    for obj, c in _grpc_containers():
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["grpc"]["port"] == port, (obj["metadata"]["name"], probe)
        seen += 1
    assert seen == 2  # query nodes and coordinator


def test_coordinator_args_are_a_valid_facepq_command():
    (dep,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "facepq-coordinator"]
    args = parse_cli(dep["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.command == "coordinator" and args.redis and args.port == 50050


def _node_script(sts) -> str:
    return sts["spec"]["template"]["spec"]["containers"][0]["args"][0]


@pytest.mark.parametrize("nodes,replicas,shards", [(4, 2, 4), (3, 1, 3), (5, 2, 4), (4, 2, 2), (2, 2, 2)])
def test_statefulset_entrypoint_assigns_every_shard_to_replicas_pods(tmp_path, nodes, replicas, shards):
    """Run the pod's real shell script per ordinal, with a stand-in `facepq` that records its arguments."""
    (sts,) = by_kind("StatefulSet")
    env_names = {e["name"] for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"POD_NAME", "POD_IP", "SHARDS", "NODES", "REPLICAS_PER_SHARD", "REDIS_URL"} <= env_names
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "facepq").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (fake / "facepq").chmod(0o755)
    (fake / "python").symlink_to(sys.executable)
    served: dict[int, list[int]] = {s: [] for s in range(shards)}
    for i in range(nodes):
        env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", PYTHONPATH=str(REPO), POD_NAME=f"facepq-node-{i}",
                   POD_IP="10.0.0.%d" % (i + 1), SHARDS=str(shards), NODES=str(nodes),
                   REPLICAS_PER_SHARD=str(replicas), REDIS_URL="redis://facepq-redis:6379/0")
        out = subprocess.run(["/bin/sh", "-c", _node_script(sts)], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        argv = out.stdout.split("\n")[1:-1]  # first line: the script's own echo
        args = parse_cli(argv)
        assert args.command == "node" and args.host == f"10.0.0.{i + 1}" and args.node_id == f"facepq-node-{i}"
        for s in args.shards:
            assert (i - s * replicas) % nodes < replicas  # the documented formula
            served[s].append(i)
    assert all(len(pods) == replicas for pods in served.values()), served


def test_statefulset_defaults_are_consistent():
    (sts,) = by_kind("StatefulSet")
    env = {e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert int(env["NODES"]) == sts["spec"]["replicas"], "NODES must equal spec.replicas"
    assert 1 <= int(env["REPLICAS_PER_SHARD"]) <= int(env["NODES"])
    (svc,) = [s for s in by_kind("Service") if s["metadata"]["name"] == sts["spec"]["serviceName"]]
    assert svc["spec"]["clusterIP"] == "None"
    (job,) = by_kind("RayJob")
    assert f"--shards {env['SHARDS']}" in job["spec"]["entrypoint"], "ingest and nodes must agree on the shard count"


# ---- docker compose -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())


def test_compose_has_every_role_and_the_shared_volumes(compose):
    services = compose["services"]
    assert {"redis", "ray-head", "ray-worker", "coordinator", "ingest", "train"} <= set(services)
    nodes = [n for n in services if n.startswith("node-")]
    assert len(nodes) >= 2
    assert {"index", "models", "gallery"} <= set(compose["volumes"])
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            volume = mount.split(":")[0]
            assert volume in compose["volumes"], (name, mount)
    for n in nodes:
        assert "index:/index:ro" in services[n]["volumes"]
    assert "index:/index" in services["ingest"]["volumes"] and "index:/index" in services["coordinator"]["volumes"]


def test_compose_long_running_services_have_healthchecks_and_jobs_are_profiles(compose):
    services = compose["services"]
    for name in ["redis", "ray-head", "coordinator"] + [n for n in services if n.startswith("node-")]:
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    for job in ("ingest", "train", "search"):
        assert services[job]["profiles"] == ["jobs"]
    assert services["coordinator"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_commands_are_valid_facepq_commands(compose):
    services = compose["services"]
    for name in [n for n in services if n.startswith("node-")]:
        svc = services[name]
        args = parse_cli(svc["command"])
        # the node binds and announces its service name, and the healthcheck asks exactly there
        assert args.host == name and svc["healthcheck"]["test"][-1] == f"{name}:{args.port}"
        assert args.redis == "redis://redis:6379/0"
    all_shards = sorted({s for n in services if n.startswith("node-") for s in parse_cli(services[n]["command"]).shards})
    ingest_cmd = [re.sub(r"\$\{FACEPQ_SHARDS:-(\d+)\}", r"\1", a) for a in services["ingest"]["command"]]
    ingest = parse_cli(ingest_cmd)
    assert all_shards == list(range(ingest.shards)), "the nodes must cover every shard the ingest creates"
    assert ingest.ray_address == "ray-head:6379"
    coord = parse_cli(services["coordinator"]["command"])
    assert coord.command == "coordinator" and coord.redis and coord.host == "0.0.0.0"
    assert parse_cli(services["train"]["command"]).command == "train"
    assert services["ray-head"]["entrypoint"] == ["ray"] and "--head" in services["ray-head"]["command"]


# ---- Dockerfile ---------------------------------------------------------------------------------
def test_dockerfile_builds_one_image_for_every_role():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert entry and yaml.safe_load(entry.group(1))[-1] == "facepq"
    assert "facepq_proto.build" in text  # stubs are generated, never committed
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\S+) ", text, re.M))
    for pattern in packages:
        assert pattern.rstrip("*") in copied, f"the image misses package {pattern}"
    for src in copied:
        if "*" not in src:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    assert "EXPOSE 50050 50051" in text
