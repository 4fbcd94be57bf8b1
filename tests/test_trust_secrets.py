"""Secrets and exposure (issue 34, items 7 and 9): nothing that carries a secret is forwarded to a
cluster, no URL ddm logs or stores keeps its credentials, no token goes to another machine in the
clear, the local Ray runtime listens on 127.0.0.1 only, the shipped manifests and images are hardened."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddm.core.secrets import check_forwarded, check_token_transport, looks_secret, redact_url, redact_urls

ROOT = Path(__file__).resolve().parents[1]

SECRET_NAMES = [
    "AZURE_STORAGE_CONNECTION_STRING", "GH_PAT", "GITHUB_PAT", "NPM_AUTH", "NPM_AUTH_TOKEN", "DATABASE_URL",
    "REDIS_URL", "MONGODB_URI", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "WANDB_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS",
    "SSH_KEY", "DB_PASSWORD", "PGPASSWORD", "SENTRY_DSN", "AZURE_STORAGE_SAS", "AZURE_CLIENT_SECRET",
    "BASIC_AUTHORIZATION", "SESSION_COOKIE", "SLACK_WEBHOOK_URL", "MY_PRIVATE_PEM", "DB_PWD",
]  # fmt: skip
SETTINGS = [
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "NO_PROXY",
    "GIT_AUTHOR_NAME", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "DDM_FAULT", "PYTHONPATH",
    "DDM_ALLOW_PLAINTEXT_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "SSH_AUTH_SOCK",
]  # fmt: skip


def test_the_name_list_catches_secrets_and_lets_settings_through():
    assert [n for n in SECRET_NAMES if not looks_secret(n)] == []
    assert [n for n in SETTINGS if looks_secret(n)] == []


@pytest.mark.parametrize(
    "url,redacted",
    [
        ("https://user:hunter2@host:8265/a/b", "https://<redacted>@host:8265/a/b"),
        ("https://ghp_abcdefghijklmnopqrstu@github.com/o/r.git", "https://<redacted>@github.com/o/r.git"),
        (
            "https://b.s3.amazonaws.com/d.tar?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F&X-Amz-Signature=f00d",
            "https://b.s3.amazonaws.com/d.tar?<redacted>",
        ),
        ("https://acct.blob.core.windows.net/c/x.parquet?sv=2022&sig=abc%3D", "https://acct.blob.core.windows.net/c/x.parquet?<redacted>"),
        ("http://h/x#access_token=abc", "http://h/x#<redacted>"),
        ("s3://bucket/runs/digits", "s3://bucket/runs/digits"),
        ("http://127.0.0.1:8265", "http://127.0.0.1:8265"),
        ("runs/digits", "runs/digits"),
        ("digits", "digits"),
    ],
)  # fmt: skip
def test_redact_url_drops_userinfo_query_and_fragment(url, redacted):
    assert redact_url(url) == redacted
    assert redact_url(redacted) == redacted  # idempotent: a stored, redacted URL compares equal to a new one


def test_redact_urls_in_a_message():
    text = "Failed to connect to Ray at address: http://user:hunter2@h:8265. (see https://x/y?token=t0k3n)"
    assert (
        redact_urls(text)
        == "Failed to connect to Ray at address: http://<redacted>@h:8265. (see https://x/y?<redacted>)"
    )


@pytest.mark.parametrize(
    "tree,named",
    [
        ({"env_vars": {"GH_PAT": "x"}}, "env_vars.GH_PAT"),
        ({"env_vars": {"https_proxy": "http://proxy:3128"}}, "env_vars.https_proxy"),
        ({"pip": ["torch", "--index-url https://me:pw123456@pypi.example/simple"]}, "pip[1]"),
        ({"working_dir": "https://b.s3.amazonaws.com/w.zip?X-Amz-Signature=f00d&X-Amz-Credential=AKIA"}, "working_dir"),
        ({"container": {"run_options": ["--env", "AWS_SECRET_ACCESS_KEY=abc"]}}, "container.run_options[1]"),
        ({"container": {"run_options": ["-e AZURE_STORAGE_CONNECTION_STRING=abc"]}}, "container.run_options[0]"),
        ({"env_vars": {"KEY_MATERIAL": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn...\n"}}, "env_vars.KEY_MATERIAL"),
        ({"env_vars": {"MY_SETTING": "ghp_" + "a1" * 18}}, "env_vars.MY_SETTING"),
        ({"config": {"init_from": "https://user:pw@store.example/run/experts/00"}}, "config.init_from"),
    ],
)  # fmt: skip
def test_check_forwarded_refuses_what_carries_a_secret_and_names_the_field(tree, named):
    with pytest.raises(ValueError) as e:
        check_forwarded(tree, "the test payload")
    message = str(e.value)
    assert message.startswith("the test payload: ") and named in message, message
    for value in ("pw123456", "f00d", "=abc", "b3Blbn", "a1a1a1", "user:pw"):
        assert value not in message  # names the field, never shows the value


def test_check_forwarded_refuses_the_value_of_a_secret_of_this_shell(monkeypatch):
    monkeypatch.setenv("DDM_TEST_API_TOKEN", "s3cr3t-value-0042")
    with pytest.raises(ValueError, match=r"env_vars\.INNOCENT.*\$DDM_TEST_API_TOKEN") as e:
        check_forwarded({"env_vars": {"INNOCENT": "prefix-s3cr3t-value-0042"}}, "payload")
    assert "s3cr3t-value-0042" not in str(e.value)


def test_check_forwarded_lets_an_ordinary_submission_through(monkeypatch, tmp_path):
    monkeypatch.setenv("DDM_TEST_TOKEN_PATH", str(tmp_path))  # a path, not a secret: its value may appear
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a mode, not a secret
    monkeypatch.setenv("DDM_TEST_SECRET", str(tmp_path / "key.json"))  # an existing file's path, not a secret
    (tmp_path / "key.json").write_text("{}")
    check_forwarded(
        {
            "entrypoint": f"ddm train expert -c {tmp_path}/key.json.d/expert-00.config.json --lease-wait 300",
            "runtime_env": {
                "env_vars": {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"},
                "pip": [
                    "git+ssh://git@github.com/org/pkg.git",
                    "torch --index-url https://download.pytorch.org/whl/cpu",
                ],
            },
            "metadata": {"ddm_job": "expert-00", "ddm_run": "0123abcd", "note": "auth disabled"},
            "config": {"store": "s3://bucket/run", "model": {"text": {"max_tokens": 77}}, "lr": 1e-4},
        },
        "payload",
    )


def _islands_file(tmp_path, island: dict, **top) -> str:
    path = tmp_path / "islands.yaml"
    path.write_text(
        yaml.safe_dump({"store": "s3://b/r", "islands": {"west": {"address": "http://h:8265", **island}}, **top})
    )
    return str(path)


@pytest.mark.parametrize(
    "runtime_env,named",
    [
        ({"env_vars": {"GH_PAT": "x"}}, "islands.west.runtime_env.env_vars.GH_PAT"),
        ({"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}, "islands.west.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"),
        ({"pip": ["--index-url https://me:pw123456@pypi.example/simple"]}, "islands.west.runtime_env.pip[0]"),
    ],
)
def test_the_islands_file_refuses_secrets_in_an_islands_runtime_env(tmp_path, runtime_env, named):
    """The documented refusal of secret names holds for runtime_env.env_vars too, not only for env."""
    from ddm.launchers.plan import load_islands

    with pytest.raises(ValueError, match=re.escape(named)) as e:
        load_islands(_islands_file(tmp_path, {"runtime_env": runtime_env}))
    assert "pw123456" not in str(e.value)


@pytest.mark.parametrize(
    "name", ["AZURE_STORAGE_CONNECTION_STRING", "GH_PAT", "NPM_AUTH", "DATABASE_URL", "HTTPS_PROXY"]
)
def test_the_islands_file_refuses_to_forward_the_wider_list(tmp_path, name):
    from ddm.launchers.plan import load_islands

    with pytest.raises(ValueError, match=f"{name}, which looks like a secret"):
        load_islands(_islands_file(tmp_path, {}, env=[name]))


def test_submit_refuses_a_forwarded_value_with_credentials_before_anything_happens(tmp_path, monkeypatch):
    """A forwarded variable's value comes from the shell at submission: checked there, before any
    island is contacted or anything is written to the store."""
    from ddm.launchers.islands import submit
    from ddm.launchers.plan import load_islands
    from ddm.launchers.spec import RunSpec

    monkeypatch.setenv("DDM_TEST_ENDPOINT", "http://minio:pw123456@minio.example:9000")
    store = tmp_path / "store"
    islands = load_islands(
        _islands_file(tmp_path, {"address": "http://ray-far.invalid:8265"}, store=str(store), env=["DDM_TEST_ENDPOINT"])
    )
    with pytest.raises(ValueError, match=r"runtime_env\.env_vars\.DDM_TEST_ENDPOINT holds a URL with credentials") as e:
        submit(RunSpec(store=str(store)), islands)
    assert "pw123456" not in str(e.value)
    assert not any(store.rglob("*")) if store.exists() else True  # nothing written


def test_ddm_run_refuses_a_spec_whose_job_configs_would_carry_credentials(tmp_path):
    """Job configs go to Ray with each job and into every checkpoint: checked before anything starts."""
    from ddm.launchers.run import run_pipeline
    from ddm.launchers.spec import RunSpec

    store = tmp_path / "run"
    spec = RunSpec(store=str(store), expert_overrides={"0": ["init_from=https://me:pw123456@h.example/run/experts/00"]})
    with pytest.raises(ValueError, match=r"the spec: expert_overrides\.0\[0\] holds a URL with credentials") as e:
        run_pipeline(spec)
    assert "pw123456" not in str(e.value) and not store.exists()


def test_an_island_address_with_a_password_is_not_echoed():
    from ddm.launchers.islands import IslandError, client
    from ddm.launchers.plan import Island

    with pytest.raises(IslandError, match="cannot be reached") as e:
        client("a", Island("http://user:hunter2@127.0.0.1:1"))
    assert "hunter2" not in str(e.value) and "http://<redacted>@127.0.0.1:1" in str(e.value)


def test_a_token_is_not_sent_in_the_clear_to_another_machine(monkeypatch):
    from ddm.launchers.islands import client
    from ddm.launchers.plan import Island

    monkeypatch.delenv("DDM_ALLOW_PLAINTEXT_TOKEN", raising=False)
    monkeypatch.setenv("DDM_TEST_TOKEN", "t0k3n-value-abcdef")
    with pytest.raises(ValueError, match=r"plain http.*DDM_ALLOW_PLAINTEXT_TOKEN=ray-far\.invalid") as e:
        client("far", Island("http://ray-far.invalid:8265", auth_token_env="DDM_TEST_TOKEN"))
    assert "t0k3n" not in str(e.value) and len(str(e.value).splitlines()) == 1
    # Ray's own token (RAY_AUTH_MODE=token) goes out just the same, and so does a password in the URL.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ValueError, match="plain http"):
        client("far", Island("http://ray-far.invalid:8265"))
    monkeypatch.delenv("RAY_AUTH_MODE")
    with pytest.raises(ValueError, match="plain http") as e:
        client("far", Island("http://user:hunter2@ray-far.invalid:8265"))
    assert "hunter2" not in str(e.value)


def test_plaintext_is_allowed_to_loopback_over_tls_and_where_the_user_names_the_host(monkeypatch):
    monkeypatch.delenv("DDM_ALLOW_PLAINTEXT_TOKEN", raising=False)
    for ok in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "https://ray.example:443"):
        check_token_transport(ok, "island 'x'")
    with pytest.raises(ValueError, match="DDM_ALLOW_PLAINTEXT_TOKEN=10.0.0.5"):
        check_token_transport("http://10.0.0.5:8265", "island 'x'")
    with pytest.raises(ValueError, match="DDM_ALLOW_PLAINTEXT_TOKEN=head.internal"):
        check_token_transport("ray://head.internal:10001", "--address")
    with pytest.raises(ValueError, match="DDM_ALLOW_PLAINTEXT_TOKEN=head.internal"):
        check_token_transport("head.internal:6379", "--address")  # a GCS address: Ray's gRPC, no TLS by default
    monkeypatch.setenv("DDM_ALLOW_PLAINTEXT_TOKEN", "10.0.0.5, other.example")
    check_token_transport("http://10.0.0.5:8265", "island 'x'")  # opted in by name
    with pytest.raises(ValueError):
        check_token_transport("http://10.0.0.6:8265", "island 'x'")  # only the hosts named


def test_the_example_islands_file_sends_its_tokens_safely(monkeypatch):
    """Its islands carry tokens (auth_token_env): each is reached over TLS or a port-forward."""
    from ddm.launchers.plan import load_islands

    monkeypatch.delenv("DDM_ALLOW_PLAINTEXT_TOKEN", raising=False)
    for name, island in load_islands(str(ROOT / "cluster/islands.example.yaml")).islands.items():
        assert island.auth_token_env
        check_token_transport(island.address, f"island {name!r}")


def test_connecting_to_a_remote_cluster_with_a_token_in_the_clear_is_refused(monkeypatch):
    from ddm.distributed.ray_runtime import ray_cluster

    monkeypatch.delenv("DDM_ALLOW_PLAINTEXT_TOKEN", raising=False)
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ValueError, match="DDM_ALLOW_PLAINTEXT_TOKEN=ray-far.invalid"):
        with ray_cluster("ray://ray-far.invalid:10001"):
            pass
    import ray

    assert not ray.is_initialized()  # refused before Ray was started or connected


def test_the_dataset_manifest_records_its_source_without_credentials(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ddm.data.config import IngestConfig
    from ddm.data.ingest import ingest
    from ddm.store import Store
    from tests.test_data import _png

    signed = "shards?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=f00dfeed"  # a folder of Parquet files
    (tmp_path / signed).mkdir()
    images = [{"bytes": _png((i * 40, 0, 0)), "path": f"{i}.png"} for i in range(4)]
    pq.write_table(pa.table({"image": images, "label": [0, 1, 0, 1]}), tmp_path / signed / "part-0.parquet")
    store = Store(str(tmp_path / "run"))
    ingest(IngestConfig(source=f"file://{tmp_path}/{signed}", resolution=8, runner="local"), store)
    text = store.read_bytes("data/MANIFEST.json").decode()
    assert "f00dfeed" not in text and "AKIAEXAMPLE" not in text
    assert json.loads(text)["ingest"]["source"] == f"file://{tmp_path}/shards?<redacted>"
    # Ingesting again from the same URL is the same dataset: nothing to do, nothing refused.
    ingest(IngestConfig(source=f"file://{tmp_path}/{signed}", resolution=8, runner="local"), store)
    assert store.read_bytes("data/MANIFEST.json").decode() == text


def test_logs_never_carry_credentials_in_urls():
    """Whatever module logs a URL, the one logging set-up redacts its userinfo and signed query."""
    code = (
        "import logging\nfrom ddm.core.logs import setup_logging\nsetup_logging()\n"
        "logging.getLogger('ddm.x').warning('reading %s', 'https://alice:hunter2@host/x?X-Amz-Signature=f00d')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "reading https://host/x?<redacted>" in out.stderr or "<redacted>" in out.stderr, out.stderr
    assert "hunter2" not in out.stderr and "f00d" not in out.stderr


# --- exposure -----------------------------------------------------------------------------------


def test_a_local_runtime_resolves_its_node_address_to_loopback():
    """Ray turns a loopback node address into the machine's interface address on Linux; inside
    ``loopback_node`` (the local runtime's ray.init) it stays 127.0.0.1, and only there."""
    from ray._private import services

    from ddm.distributed.ray_runtime import loopback_node

    with loopback_node():
        assert services.get_node_ip_address() == "127.0.0.1"
        assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
    import ray._private.ray_constants as rc

    assert rc.ENABLE_RAY_CLUSTER == (os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1") not in ("0", "false"))


@pytest.mark.slow
def test_the_local_runtime_listens_on_loopback_only():
    """Every socket the local runtime's processes listen on (GCS, raylet, agents, workers) is loopback."""
    import ipaddress

    import psutil
    import ray

    from ddm.distributed.ray_runtime import ray_cluster

    with ray_cluster(num_cpus=1, log_to_driver=False):
        ray.get(ray.remote(lambda: 1).remote())
        session = ray._private.worker._global_node.get_session_dir_path()
        pids = {p.pid for p in psutil.Process().children(recursive=True)}
        for p in psutil.process_iter(["cmdline"]):
            if session in " ".join(p.info["cmdline"] or []):
                pids.add(p.pid)
        listening = {
            (c.laddr.ip, psutil.Process(c.pid).name())
            for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids
        }
    assert listening
    exposed = [(ip, name) for ip, name in listening if not ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback]
    assert exposed == []


def _yaml(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def test_dashboards_listen_on_the_pod_network_only_where_kuberay_needs_it():
    head = _yaml("cluster/ray-cluster.yaml")["head_start_ray_commands"]
    assert any("--dashboard-host=127.0.0.1" in c for c in head) and not any("0.0.0.0" in c for c in head)
    raycluster = _yaml("cluster/kuberay/raycluster.yaml")
    assert raycluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    # A RayJob's submitter pod and the operator reach the job server over the pod network: 0.0.0.0
    # stays there, and the manifest says why next to it.
    rayjob = (ROOT / "cluster/kuberay/rayjob.yaml").read_text()
    line = next(ln for ln in rayjob.splitlines() if "dashboard-host" in ln)
    assert '"0.0.0.0"' in line and "pod network" in line


def _pods(node):
    """Every pod spec (a mapping with containers) in a YAML tree."""
    if isinstance(node, dict):
        return ([node] if "containers" in node else []) + [p for v in node.values() for p in _pods(v)]
    if isinstance(node, list):
        return [p for v in node for p in _pods(v)]
    return []


@pytest.mark.parametrize("path", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_kuberay_pods_run_unprivileged(path):
    uid = re.search(r"useradd .*--uid (\d+) ray", (ROOT / "docker/Dockerfile.gpu").read_text()).group(1)
    pods = _pods(_yaml(path))
    assert len(pods) == 2  # head and worker group
    for pod in pods:
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == int(uid) and ctx["fsGroup"] == int(uid)
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc.get("privileged", False) is False


def _bases(dockerfile: str) -> list[tuple[str, str]]:
    """(image:tag, ARG) of each FROM; every FROM must be pinned by a digest build argument."""
    text = (ROOT / "docker" / dockerfile).read_text()
    froms = re.findall(r"^FROM (\S+)", text, flags=re.M)
    out = []
    for ref in froms:
        m = re.fullmatch(r"([\w./-]+:[\w.-]+)@\$\{(\w+)\}", ref)
        assert m, f"{dockerfile}: FROM {ref} is not pinned by a digest build argument"
        declared = re.search(rf"^ARG {m.group(2)}(=\S*)?$", text, flags=re.M)
        assert declared and declared.start() < text.index(f"FROM {ref}"), f"ARG {m.group(2)} before FROM"
        assert declared.group(1) is None, f"ARG {m.group(2)} has a default: a build without a digest must fail"
        out.append((m.group(1), m.group(2)))
    assert out and "docker/base-digests.sh" in text
    return out


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_docker_bases_are_pinned_by_digest(dockerfile, tmp_path):
    """Each base is named by tag and digest; the digest is a build argument without a default (a
    build without it fails rather than taking whatever the tag names that day), which
    docker/base-digests.sh prints from the digests `--resolve` recorded, and refuses without them."""
    bases = _bases(dockerfile)
    script = ROOT / "docker" / "base-digests.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    record = tmp_path / "digests.txt"
    record.write_text("# none\n")
    env = {**os.environ, "DDM_BASE_DIGESTS": str(record), "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    dockerfile_path = str(ROOT / "docker" / dockerfile)
    out = subprocess.run([str(script), dockerfile_path], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "--resolve" in out.stderr and bases[0][0] in out.stderr
    # --resolve asks the registry (here a stand-in `docker` answering as `buildx imagetools inspect`
    # does) for each base's digest and records it; the build arguments come from the record.
    digest = "sha256:" + "0123456789abcdef" * 4
    fake = tmp_path / "docker"
    fake.write_text(f"#!/bin/sh\nprintf 'Name:      %s\\nMediaType: x\\nDigest:    {digest}\\n' \"$4\"\n")
    fake.chmod(0o755)
    resolved = subprocess.run([str(script), "--resolve"], env=env, capture_output=True, text=True)
    assert resolved.returncode == 0, resolved.stderr
    assert {(image, digest) for image, _ in bases} <= {
        tuple(ln.split()) for ln in record.read_text().splitlines() if ln[:1] != "#"
    }
    out = subprocess.run([str(script), dockerfile_path], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == [
        w for _, arg in bases for w in ("--build-arg", f"{arg}={digest}")
    ]


def test_recorded_base_digests_are_well_formed():
    """docker/base-digests.txt holds only digests of bases the Dockerfiles name (none yet: no registry
    could be reached where it was written)."""
    names = {image for f in ("Dockerfile.cpu", "Dockerfile.gpu") for image, _ in _bases(f)}
    for line in (ROOT / "docker" / "base-digests.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            image, digest = line.split()
            assert image in names and re.fullmatch(r"sha256:[0-9a-f]{64}", digest), line
