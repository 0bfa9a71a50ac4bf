"""A 100M-parameter model across server shards on shared memory: training, checkpoints,
a resume, and each server's peak memory against its range's weights and optimizer state.

    python scripts/bench_bigmodel.py [--layers 784,8192,8192,4096,10] [--servers 4]
                                     [--updates 300] [--more 100] [--batch-size 128]

Two legs of ``psgd train --servers K --workers 1 --transport shm`` (momentum, the
default optimizer), one after the other in a run directory of its own:

1. ``--max-updates UPDATES``: trains, the coordinator stops the run, every server writes
   its final checkpoint (they also checkpoint every 5 s on the way);
2. ``--resume RUN --max-updates UPDATES+MORE``: every server restarts from its newest
   checkpoint; the script checks, from each server's log, that it resumed at the version
   its checkpoint holds, and that the run went on from there to the new budget.

While each leg runs the script reads every process's peak resident memory (VmHWM in
/proc/PID/status: the kernel's own high-water mark, so no sample can miss a peak) and
prints, per server shard: its range, the bytes of its weights and optimizer state, what
is in flight (the worker's shared-memory gradient segment of that range, which the server
maps, and one copy of the range in a ZeroMQ reply: the coordinator's pulls), a bare
Python process's memory with psgd's imports, the bound (their sum, plus the optimizer's
scratch block and numpy's checkpoint buffer), the peak, and the ratios peak / bound and
peak / (weights + optimizer state). Updates/s is the coordinator's (updates over training
time, evaluations excluded). The worker and the coordinator (the launching process) are
listed too: each holds the whole vector, not a range.

On a small machine the step itself dominates: at batch 128 one forward and backward pass
of the default model is about 80 GFLOP. Run nothing else big beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import blas_description, clean_blas_env  # noqa: E402

clean_blas_env(sys.argv)

from psgd.model.layout import shard_range  # noqa: E402
from psgd.model.network import MLP, ModelSpec, parse_sizes  # noqa: E402
from psgd.model.optim import BLOCK, OptimizerSpec, make_optimizer  # noqa: E402

MB = 1e6
SAMPLE_S = 0.25
IN_FLIGHT = 2  # the worker's gradient segment, and one copy of the range in a reply over ZeroMQ (the coordinator's pulls)
SCRATCH_BYTES = BLOCK * 4 + 16 * 2**20  # the optimizer's scratch block; numpy's checkpoint-writing buffer


def status_kb(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmHWM, VmRSS, RssAnon, RssShmem, ...); {} once gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines())
            if v.strip().endswith("kB")}


def children(ppid: int) -> dict[int, list[str]]:
    """pid -> argv of the processes whose parent is ``ppid``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError, IndexError):
            pass
    return found


def role_of(argv: list[str]) -> str | None:
    """``server-K`` or ``worker-I`` for a launcher's child, from its command line."""
    if "psgd" not in argv:
        return None
    rest = argv[argv.index("psgd") + 1:]
    if rest[:1] == ["server"]:
        return f"server-{rest[rest.index('--shard') + 1]}" if "--shard" in rest else "server-0"
    if rest[:1] == ["worker"]:
        return rest[rest.index("--name") + 1] if "--name" in rest else "worker"
    return None


def run_leg(args: list[str]) -> tuple[dict[str, dict], float]:
    """Run ``psgd train ARGS``, reading every process's peak memory as it goes; return
    {name: last /proc status seen} (the coordinator is ``coordinator``) and the wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "psgd", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: dict[str, dict] = {}
    pids: dict[int, str] = {}
    while proc.poll() is None:
        for pid, argv in children(proc.pid).items():
            name = role_of(argv)
            if name is not None:
                pids[pid] = name
        for pid, name in list(pids.items()) + [(proc.pid, "coordinator")]:
            fields = status_kb(pid)
            if fields:  # VmHWM only grows: the last reading holds the peak
                seen[name] = fields
        time.sleep(SAMPLE_S)
    out = proc.stdout.read()
    if proc.returncode != 0:
        print(f"psgd train {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}\nmemory until then:")
        return seen, None
    return seen, time.perf_counter() - t0


def bare_process_kb() -> int:
    """The peak memory of a Python process that imports what a server imports, and nothing else."""
    code = ("import psgd.server.loop, psgd.cli, pathlib;"
            "print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0])")
    line = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(line.split()[1])


def newest_checkpoint(folder: Path) -> int:
    names = sorted(folder.glob("checkpoint-*.npz"))
    return int(names[-1].stem.split("-")[1]) if names else -1


def resumed_at(log: Path) -> int | None:
    found = re.findall(r"resumed from \S+ at version (\d+)", log.read_text())
    return int(found[-1]) if found else None


def shard_table(seen, ranges, state_arrays, bare_kb, buffers):
    print(f"{'process':>12} {'range':>12} {'weights':>8} {'opt state':>9} {'in flight':>9} "
          f"{'bare':>6} {'bound':>7} {'peak RSS':>9} {'peak/bound':>10} {'peak/(w+s)':>10}")
    for k, (lo, hi) in enumerate(ranges):
        f = seen.get(f"server-{k}", {})
        n = (hi - lo) * 4
        weights, state, flight = n, n * state_arrays, n * buffers
        peak = f.get("VmHWM", 0) * 1024
        bound = bare_kb * 1024 + weights + state + flight + SCRATCH_BYTES
        print(f"{'server-' + str(k):>12} {hi - lo:>12,} {weights / MB:7.0f}M {state / MB:8.0f}M {flight / MB:8.0f}M "
              f"{bare_kb * 1024 / MB:5.0f}M {bound / MB:6.0f}M {peak / MB:8.0f}M {peak / bound:10.2f} "
              f"{peak / (weights + state):10.2f}")
    for name in sorted(seen):
        if not name.startswith("server"):
            print(f"{name:>12} {'(all)':>12} {'':>8} {'':>9} {'':>9} {'':>6} {'':>7} "
                  f"{seen[name].get('VmHWM', 0) * 1024 / MB:8.0f}M")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="784,8192,8192,4096,10")
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--updates", type=int, default=300, help="the first leg's --max-updates")
    ap.add_argument("--more", type=int, default=100, help="updates the resumed leg adds")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--validation", type=int, default=1000, help="validation images (each evaluation is a "
                    "forward pass of the whole model over them)")
    ap.add_argument("--lease", type=float, default=10.0, help="workers' lease: longer on a loaded machine, where "
                    "one step of this model can outlast the default 10 s")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one, removed)")
    args = ap.parse_args()

    n = MLP(ModelSpec(parse_sizes(args.layers))).n_params
    ranges = [shard_range(n, k, args.servers) for k in range(args.servers)]
    state_arrays = len(make_optimizer(OptimizerSpec("momentum"), 1).state_names)
    bare_kb = bare_process_kb()
    print(f"model {args.layers}: {n:,} parameters, {n * 4 / MB:.0f} MB of weights; {args.servers} server shards, "
          f"1 worker, shared memory, momentum, batch {args.batch_size}; {os.cpu_count()} CPUs")
    print(blas_description())
    print("columns: the shard's weights, optimizer state (momentum: the velocity) and what is in flight (the "
          "worker's shared-memory gradient segment of the range, which the server maps, and one copy of the range "
          "in a reply over ZeroMQ: the coordinator pulls the weights that way); bare = a Python process with psgd's "
          "imports; bound = their sum plus the optimizer's scratch block and numpy's 16 MiB checkpoint buffer\n")

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    run = Path(args.out or tmp.name) / "run"
    common = ["--layers", args.layers, "--servers", str(args.servers), "--workers", "1", "--transport", "shm",
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--validation", str(args.validation),
              "--schedule", "constant", "--evals-per-epoch", "1", "--lease", str(args.lease)]
    try:
        seen1, wall1 = run_leg(common + ["--max-updates", str(args.updates), "--out", str(run)])
        if wall1 is None:
            shard_table(seen1, ranges, state_arrays, bare_kb, IN_FLIGHT)
            raise SystemExit(1)
        summary1 = json.loads((run / "summary.json").read_text())
        ckpt = [newest_checkpoint(run / "checkpoints" / f"shard-{k}") for k in range(args.servers)]
        print(f"leg 1: {summary1['updates']} updates, {summary1['pushes_per_s']:.2f} updates/s over "
              f"{summary1['train_time']:.0f} s of training ({wall1:.0f} s wall), test accuracy "
              f"{summary1['test_accuracy']:.4f}; newest checkpoints (version) per shard: {ckpt}")
        shard_table(seen1, ranges, state_arrays, bare_kb, IN_FLIGHT)

        target = max(ckpt) + args.more
        seen2, wall2 = run_leg(["--resume", str(run), "--max-updates", str(target)])
        if wall2 is None:
            shard_table(seen2, ranges, state_arrays, bare_kb, IN_FLIGHT)
            raise SystemExit(1)
        summary2 = json.loads((run / "summary.json").read_text())
        resumed = [resumed_at(run / "logs" / f"server-{k}.log") for k in range(args.servers)]
        ok = resumed == ckpt and summary2["updates"] >= target
        rate2 = (summary2["updates"] - min(ckpt)) / summary2["train_time"]  # its summary's rate counts from 0
        print(f"\nleg 2 (--resume): every shard resumed at {resumed} (checkpoints held {ckpt}): "
              f"{'continues' if resumed == ckpt else 'MISMATCH'}; ran to {summary2['updates']} updates "
              f"(budget {target}), {rate2:.2f} updates/s over {summary2['train_time']:.0f} s "
              f"({wall2:.0f} s wall), test accuracy {summary2['test_accuracy']:.4f}")
        shard_table(seen2, ranges, state_arrays, bare_kb, IN_FLIGHT)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if not ok:
        raise SystemExit("the resumed run did not continue from its checkpoints")


if __name__ == "__main__":
    main()
