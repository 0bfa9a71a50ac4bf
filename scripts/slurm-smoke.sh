#!/usr/bin/env bash
# Really run deploy/slurm/psgd.sbatch on a single-node Slurm started here by hand: munged,
# slurmctld and slurmd with a minimal slurm.conf (root as SlurmUser, proctrack/linuxproc,
# task/none, no accounting, select/cons_tres), then `sbatch --wait` a short MNIST job and
# check that it reached its target, with CURVE keys made in the job's directory.
#
#   sudo bash scripts/slurm-smoke.sh        (CI runs it from .ci/run)
#
# Needs root and Debian's slurm-wlm and munge (installed here when missing), psgd on the
# PATH (an activated venv) and MNIST in $PSGD_DATA_DIR. Everything Slurm writes lives in a
# temporary folder; the daemons are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "slurm-smoke: $*"; }
fail() { echo "slurm-smoke: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (to start munged, slurmctld and slurmd)"
command -v psgd >/dev/null || fail "psgd is not on the PATH (activate the venv it is installed in)"
DATA_DIR="${PSGD_DATA_DIR:-$(cd .. && pwd)/shared/datasets}"
[ -e "$DATA_DIR/mnist" ] || fail "no MNIST under $DATA_DIR (set PSGD_DATA_DIR)"
export PSGD_DATA_DIR="$(cd "$DATA_DIR" && pwd)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

WORK="$(mktemp -d /tmp/psgd-slurm-smoke.XXXXXX)"
chmod 755 "$WORK"
cleanup() {
    set +e
    for pidfile in "$WORK"/slurmd.pid "$WORK"/slurmctld.pid "$WORK"/munged.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
    done
    sleep 1
    rm -rf "$WORK"
}
trap cleanup EXIT

# munge: a key of our own and a socket in WORK, so that nothing of the machine's is touched.
mkdir -p "$WORK/munge"
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$WORK/munge" && chmod 400 "$WORK/munge/munge.key"
MUNGE_SOCKET="$WORK/munge/munge.socket"
munged --force --key-file "$WORK/munge/munge.key" --socket "$MUNGE_SOCKET" \
    --pid-file "$WORK/munged.pid" --log-file "$WORK/munged.log" --seed-file "$WORK/munge/seed" \
    || fail "munged did not start: $(tail -5 "$WORK/munged.log" 2>/dev/null)"

HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))"
mkdir -p "$WORK/state" "$WORK/spool"
export SLURM_CONF="$WORK/slurm.conf"
cat >"$SLURM_CONF" <<CONF
ClusterName=psgdsmoke
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmctldPort=16817
SlurmdPort=16818
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmdSpoolDir=$WORK/spool
StateSaveLocation=$WORK/state
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=smoke Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

say "starting slurmctld and slurmd on $HOST ($CPUS CPUs)"
slurmctld -i -f "$SLURM_CONF" || fail "slurmctld did not start: $(tail -5 "$WORK/slurmctld.log")"
slurmd -f "$SLURM_CONF" || fail "slurmd did not start: $(tail -5 "$WORK/slurmd.log")"
for _ in $(seq 60); do
    sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed)' && break
    sleep 0.5
done
sinfo -h -o '%T' | grep -qE '^(idle|mixed)' || { tail -5 "$WORK/slurmctld.log" "$WORK/slurmd.log" >&2; fail "the node never became idle"; }

# One job: sbatch --wait, then the run's summary and logs in the submission directory.
run_job() {
    local servers="$1"
    local submit="$WORK/submit-$servers"
    say "sbatch --wait deploy/slurm/psgd.sbatch: $servers server shard(s), 2 workers on $CPUS CPUs (--overcommit), to 95%"
    mkdir -p "$submit"
    set +e
    (cd "$submit" && PSGD_SERVERS="$servers" timeout 600 sbatch --wait --overcommit --ntasks=2 --time=10 \
        "$REPO/deploy/slurm/psgd.sbatch") >"$WORK/sbatch.out" 2>&1
    local status=$?
    set -e
    cat "$WORK/sbatch.out"
    tail -6 "$submit"/psgd-*.out 2>/dev/null
    [ "$status" = 0 ] || { tail -20 "$WORK/slurmd.log" >&2; fail "the job failed (sbatch exit $status)"; }
    local summary
    summary="$(ls "$submit"/runs/psgd-*/summary.json 2>/dev/null | head -n 1)"
    [ -n "$summary" ] || fail "no summary.json under $submit/runs"
    python3 - "$summary" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"slurm-smoke: stopped on {s['stop_reason']}, test accuracy {s['test_accuracy']:.4f}, "
      f"{s['updates']} updates from {len(s['per_worker'])} workers")
assert s["stop_reason"] == "target accuracy", s["stop_reason"]
assert s["test_accuracy"] >= 0.93 and len(s["per_worker"]) == 2
PY
    local logs run
    run="$(dirname "$summary")"
    # Secure by default: the job made its keys in its own directory, and every shard took only those.
    [ -f "$run/keys/server.key_secret" ] && [ "$(stat -c %a "$run/keys/server.key_secret")" = 600 ] \
        || fail "no CURVE keys (mode 600) in $run/keys"
    for ((k = 0; k < servers; k++)); do
        grep -q "CURVE: accepting 2 client keys" "$run/logs/server-$k.log" \
            || fail "server shard $k did not run with CURVE keys: $(tail -3 "$run/logs/server-$k.log")"
    done
    say "every server shard ran with CURVE keys made in the job's directory"
    logs="$(ls "$run/logs" | tr '\n' ' ')"
    echo "slurm-smoke: logs: $logs"
    for ((k = 0; k < servers; k++)); do
        [[ " $logs " == *" server-$k.log "* ]] || fail "no log of server shard $k"
    done
}

REPO="$PWD"
export PSGD_LAYERS=784,64,10 PSGD_EPOCHS=8 PSGD_TARGET_ACCURACY=0.95 PSGD_EVALS_PER_EPOCH=2 OPENBLAS_NUM_THREADS=1
run_job 1
run_job 2
say "passed: both Slurm jobs (one server, two shards) reached their target"
