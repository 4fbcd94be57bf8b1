"""The shipped deployment files: they parse, name the images the Dockerfiles build, run entrypoints
the ddm CLI accepts, pin one set of versions, and keep Ray's token authentication on."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

import ddm
from ddm.cli import build_parser
from ddm.config import from_dict, load
from ddm.job import JobConfig
from ddm.launchers.plan import load_islands, looks_secret

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
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "docker" / name).read_text()
        assert "ENV RAY_AUTH_MODE=token" in text
        for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
            assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repo"
    assert "FROM nvidia/cuda:" in (ROOT / "docker" / "Dockerfile.gpu").read_text()


@pytest.mark.parametrize(
    "path", ["cluster/ray-cluster.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"]
)
def test_cluster_manifests_name_the_gpu_image_and_enable_auth(path):
    doc = yaml.safe_load((ROOT / path).read_text())
    found = images(doc)
    assert found and set(found) == {GPU_IMAGE}, found
    ray_pin = pins("Dockerfile.gpu")["ray"]
    if path.startswith("cluster/kuberay"):
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == ray_pin
        for c in containers(doc):
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # the token comes from a secret
            assert all("value" not in env[k] for k in env if k.startswith("AWS_"))  # no credentials in the file
    else:
        assert doc["docker"]["image"] == GPU_IMAGE
        assert "-e RAY_AUTH_MODE=token" in doc["docker"]["run_options"]
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
    assert not looks_secret("AWS_ACCESS_KEY_ID") and not looks_secret("AWS_ENDPOINT_URL")
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
