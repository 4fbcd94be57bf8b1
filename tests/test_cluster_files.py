"""The shipped deployment files: they parse, name the images the Dockerfiles build, run entrypoints
the ddm CLI accepts, pin one set of versions, and keep Ray's token authentication on."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

import ddm
from ddm.cli import build_parser
from ddm.core.config import from_dict, load
from ddm.launchers.plan import load_islands, looks_secret
from ddm.train.job import JobConfig

ROOT = Path(__file__).resolve().parents[1]
GPU_IMAGE = f"ghcr.io/ddm-project/ddm:{ddm.__version__}-gpu"


def pins(dockerfile: str) -> dict[str, str]:
    text = (ROOT / "docker" / dockerfile).read_text()
    return {
        name: re.search(rf"{name}(?:\[[^\]]*\])?==([0-9.]+)", text).group(1) for name in ("torch", "deepspeed", "ray")
    }


def images(node) -> list[str]:
    """Every `image:` value anywhere in a YAML tree."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [
            i for v in node.values() for i in images(v)
        ]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def containers(node) -> list[dict]:
    if isinstance(node, dict):
        return ([c for c in node.get("containers", [])] if "containers" in node else []) + [
            c for v in node.values() for c in containers(v)
        ]
    if isinstance(node, list):
        return [c for v in node for c in containers(v)]
    return []


def test_dockerfiles_pin_one_set_of_versions_and_keep_auth_on():
    cpu, gpu = pins("Dockerfile.cpu"), pins("Dockerfile.gpu")
    assert cpu == gpu
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert f"torch=={cpu['torch']}" in setup  # the local set-up installs the same torch
    assert constraints()["torch"] == cpu["torch"]
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "docker" / name).read_text()
        assert "ENV RAY_AUTH_MODE=token" in text
        for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
            assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repo"
    assert "FROM nvidia/cuda:" in (ROOT / "docker" / "Dockerfile.gpu").read_text()


def constraints() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def test_constraints_pin_every_dependency_and_ci_installs_from_them():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + [r for r in extras["test"] if not r.startswith("ddm[")]
    for req in extras["test"]:  # the test extra pulls other extras of ddm itself: theirs count too
        if req.startswith("ddm["):
            wanted += [r for extra in req[4:-1].split(",") for r in extras[extra]]
    assert "diffusers>=0.30" in wanted  # the encoders' packages are among them
    pinned = constraints()
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", req).group(0)).lower()
        assert name in pinned, f"{req} has no pin in constraints.txt"
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.]*", v) for v in pinned.values())  # exact, no local builds
    assert '-c "$ROOT/constraints.txt"' in (ROOT / "scripts" / "setup.sh").read_text()  # CI's install
    for name in ("torch", "deepspeed", "ray"):
        assert pins("Dockerfile.gpu")[name] == pinned[name]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_are_for_production(dockerfile):
    """A non-root user, no test extras, every install pinned by constraints.txt, DeepSpeed's CPU op
    compiled into the image (and checked there), not by each job at its start."""
    text = (ROOT / "docker" / dockerfile).read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and "useradd" in text
    last_run = max(i for i, ln in enumerate(lines) if ln.startswith("RUN "))
    assert lines.index(f"USER {users[-1]}") > last_run  # everything after the installs runs unprivileged
    assert "[test]" not in text and "pytest" not in text and "moto" not in text
    installs = [cmd for ln in lines for cmd in ln.split("&&") if "pip install" in cmd]
    for cmd in installs:
        assert "-c constraints.txt" in cmd or "download.pytorch.org" in cmd, cmd  # torch: its own index, exact pin
    assert "COPY constraints.txt" in text
    assert "DS_BUILD_SHM_COMM=1" in text and "installed_ops" in text and "deepspeed_shm_comm" in text


# KubeRay's ray.io/v1 fields (ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go, v1.5.1+)
# for the parts of the objects these manifests use, strictly: an unknown or misplaced field fails.
# ANY: a Kubernetes type checked by Kubernetes itself (pod templates). A set: an enum.
ANY = object()
AUTH_OPTIONS = {"mode": {"token", "disabled"}, "secretName": str, "enableK8sTokenAuth": bool}
HEAD_GROUP = {
    "rayStartParams": {str: str},
    "template": ANY,
    "serviceType": str,
    "headService": ANY,
    "enableIngress": bool,
}
WORKER_GROUP = {
    "groupName": str,
    "replicas": int,
    "minReplicas": int,
    "maxReplicas": int,
    "rayStartParams": {str: str},
    "template": ANY,
    "numOfHosts": int,
    "scaleStrategy": ANY,
    "suspend": bool,
    "idleTimeoutSeconds": int,
}
RAYCLUSTER_SPEC = {
    "rayVersion": str,
    "authOptions": AUTH_OPTIONS,
    "headGroupSpec": HEAD_GROUP,
    "workerGroupSpecs": [WORKER_GROUP],
    "enableInTreeAutoscaling": bool,
    "autoscalerOptions": ANY,
    "headServiceAnnotations": {str: str},
    "suspend": bool,
    "managedBy": str,
    "gcsFaultToleranceOptions": ANY,
    "upgradeStrategy": ANY,
}
RAYJOB_SPEC = {
    "entrypoint": str,
    "shutdownAfterJobFinishes": bool,
    "ttlSecondsAfterFinished": int,
    "backoffLimit": int,
    "activeDeadlineSeconds": int,
    "runtimeEnvYAML": str,
    "jobId": str,
    "submissionMode": {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"},
    "rayClusterSpec": RAYCLUSTER_SPEC,
    "clusterSelector": {str: str},
    "submitterPodTemplate": ANY,
    "suspend": bool,
    "entrypointNumCpus": float,
    "entrypointNumGpus": float,
    "deletionStrategy": ANY,
}
KUBERAY = {"RayCluster": RAYCLUSTER_SPEC, "RayJob": RAYJOB_SPEC}


def schema_errors(node, schema, where="spec") -> list[str]:
    if schema is ANY:
        return []
    if isinstance(schema, set):
        return [] if node in schema else [f"{where}: {node!r} is not one of {sorted(schema)}"]
    if isinstance(schema, type):
        ok = (
            isinstance(node, (int, float))
            if schema is float
            else isinstance(node, schema) and not (schema is int and isinstance(node, bool))
        )
        return [] if ok else [f"{where}: {node!r} is not a {schema.__name__}"]
    if isinstance(schema, list):
        if not isinstance(node, list):
            return [f"{where}: not a list"]
        return [e for i, item in enumerate(node) for e in schema_errors(item, schema[0], f"{where}[{i}]")]
    if not isinstance(node, dict):
        return [f"{where}: not an object"]
    if list(schema) == [str]:  # a map of strings
        return [e for k, v in node.items() for e in schema_errors(v, schema[str], f"{where}.{k}")]
    return [f"{where}.{k}: no such field in KubeRay's CRD" for k in node if k not in schema] + [
        e for k, v in node.items() if k in schema for e in schema_errors(v, schema[k], f"{where}.{k}")
    ]


def test_the_schema_subset_catches_what_kubectl_would_refuse():
    bad = {
        "rayVersion": "2.60.0",
        "authOptions": {"mode": "bearer", "secret": "x"},
        "headGroupSpec": {"rayStartParams": {"num-gpus": 0}, "template": {}},
        "workerGroupSpecs": [],
    }
    errors = schema_errors(bad, RAYCLUSTER_SPEC)
    assert any("authOptions.mode: 'bearer'" in e for e in errors)
    assert any("authOptions.secret: no such field" in e for e in errors)
    assert any("rayStartParams.num-gpus: 0 is not a str" in e for e in errors)


@pytest.mark.parametrize("path", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_kuberay_manifests_follow_the_crds_and_enable_auth_through_auth_options(path):
    doc = yaml.safe_load((ROOT / path).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(doc["spec"], KUBERAY[doc["kind"]]) == []
    assert set(images(doc)) == {GPU_IMAGE}
    cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert cluster["rayVersion"] == pins("Dockerfile.gpu")["ray"]
    # Token auth as KubeRay's token-auth example: authOptions with the token's secret. KubeRay then
    # sets the token on every container and gives it to the RayJob submitter and its own polling.
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ddm-ray-auth"}
    for c in containers(doc):
        names = {e["name"] for e in c.get("env", [])}
        assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, c["name"]  # KubeRay's to set, not the pods'
        assert all("value" not in e for e in c.get("env", []) if e["name"].startswith("AWS_"))  # no credentials


def test_cluster_launcher_file_follows_rays_schema_and_puts_the_token_on_every_node():
    import json

    import jsonschema
    import ray

    doc = yaml.safe_load((ROOT / "cluster/ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(doc, schema)  # the launcher's own schema
    assert doc["docker"]["image"] == GPU_IMAGE
    run = doc["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in run
    assert "-e RAY_AUTH_TOKEN" not in run  # would forward an unset variable from the node's shell
    # The token file goes to Ray's default token path on the head and every worker (file_mounts
    # are synced to all nodes, into the container, before Ray starts there).
    assert doc["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert all("--dashboard-host" not in c or "ray start --head" in c for c in doc["head_start_ray_commands"])


def test_rayjob_entrypoint_is_a_valid_ddm_command():
    doc = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "ddm"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.what) == ("train", "expert")
    cfg = load(JobConfig, ROOT / args.config, [*args.overrides, f"partition={args.partition}"])
    assert cfg.partition == 0 and cfg.ray.use_gpu and cfg.store.startswith("s3://")


def test_islands_example_loads_and_forwards_only_names():
    cfg = load_islands(str(ROOT / "cluster/islands.example.yaml"))
    assert set(cfg.islands) == {"west", "east"} and cfg.router_island == "west"
    assert all(re.fullmatch(r"[A-Z_]+", n) and not looks_secret(n) for n in cfg.env)
    assert looks_secret("AWS_ACCESS_KEY_ID") and not looks_secret("AWS_ENDPOINT_URL")  # an access key id is half a key
    assert looks_secret("AWS_SECRET_ACCESS_KEY") and looks_secret("RAY_AUTH_TOKEN") and looks_secret("SSH_KEY")
    for island in cfg.islands.values():
        from_dict(JobConfig, {"store": "x", **island.overrides})  # overrides are valid JobConfig fields
        assert island.ddm_command == "ddm" and re.fullmatch(r"RAY_AUTH_TOKEN_[A-Z]+", island.auth_token_env)


def test_islands_file_errors_name_the_problem(tmp_path):
    base = {"store": "s3://b/r", "islands": {"a": {"address": "http://h:8265"}}}
    cases = [
        ({"env": ["AWS_SECRET_ACCESS_KEY=abc"]}, "env lists variable names"),
        ({"env": ["AWS_SECRET_ACCESS_KEY"]}, "AWS_SECRET_ACCESS_KEY, which looks like a secret"),
        ({"env": ["HF_TOKEN"]}, "HF_TOKEN, which looks like a secret"),
        ({"env": ["GOOGLE_APPLICATION_CREDENTIALS"]}, "looks like a secret"),
        ({"env": ["WANDB_API_KEY"]}, "looks like a secret"),
        ({"assignment": {0: "nowhere"}}, "unknown island 'nowhere'"),
        ({"islands": {"a": {"address": "h:8265"}}}, "must be the job server's URL"),
        ({"islands": {"a": {"address": "http://h:8265", "overrides": {"partition": 3}}}}, "may not set ['partition']"),
        ({"steps_policy": "random"}, "steps_policy must be fixed or proportional"),
        ({"islands": {"a": {"address": "http://h:8265", "auth_token_env": "s3cr3t-t0ken!"}}}, "never the token itself"),
        ({"router_island": "b"}, "router_island 'b' is not one of the islands"),
    ]
    for change, message in cases:
        p = tmp_path / "i.yaml"
        p.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(ValueError, match=re.escape(message)):
            load_islands(str(p))
