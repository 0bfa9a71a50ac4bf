"""Pushes per second a psgd server applies, against the limit of a raw ZeroMQ socket;
and pushes per second of a 10M-parameter model over 1, 2 and 4 server shards.

    python scripts/bench_server.py [--seconds 3] [--clients 1 2 4] [--layers 784,1024,192,10]
                                   [--shards 1 2 4] [--shard-layers 784,4096,1600,10] [--shard-clients 2]

For a model of about 1M parameters (float32, 4 MB per push), N client processes push
gradients over ZeroMQ on loopback as fast as the server acknowledges them (each waits
for its ack, as a worker does). The same run measures the limit: a bare ROUTER socket that
receives the same frames, applies the same momentum update with the same numpy code and
answers a 16-byte ack. The ratio column is psgd / limit (target: at least 0.70).
Runs alternate psgd and the limit so that machine noise hits both alike.

The shard table: K server processes each hold 1/K of a 9.8M-parameter model (39 MB per
push); each client sends every shard its range with all K pushes in flight at once, as a
worker does, and counts whole pushes. The ratio is against 1 shard in the same run. On a
machine with few cores the shards compete with the clients for CPU: the gain needs cores.

    python scripts/bench_server.py --grid [--grid-clients 1 4 16] [--grid-shards 1 2 4]
                                   [--grid-models 0.3M 10M 100M] [--grid-transport zmq shm]

The grid: models of 0.3M, 10M and 100M parameters, 1..16 clients, 1, 2 and 4 shards,
each pushing over ZeroMQ on loopback (every byte of a gradient through TCP, on the same
cores as the server) and over psgd's shared-memory path (the gradient in a segment the
server maps, a doorbell per push: what a worker on the server's host uses);
pushes/s and GB/s of gradient applied per shard, next to the limit for the same update
measured in the same run: this process's numpy momentum update plus the finiteness check
(one dot product) over an array of one shard's range, back to back, as pushes/s. The
ratio psgd / limit is the share of a shard's time spent in the update itself (target:
>= 0.5 for 10M and 100M).

    python scripts/bench_server.py --apply-threads 1 2 [--apply-size 25000000] [--seconds 2]

Multi-core apply: the limit's work (dot product and momentum update) on one shard's range
of 25M values, cut into contiguous chunks applied by a pool of 1, 2, ... threads, to see
whether one server process could use more than one core for a large range.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import blas_description, clean_blas_env  # noqa: E402

clean_blas_env(sys.argv)

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from psgd.model.network import MLP, ModelSpec, parse_sizes  # noqa: E402
from psgd.model.optim import OptimizerSpec, make_optimizer  # noqa: E402
from psgd.wire.client import ParameterClient  # noqa: E402
from psgd.wire.protocol import encode  # noqa: E402
from psgd.wire.transport import Client  # noqa: E402


# --- the limit: a bare ROUTER with the same update ----------------------------------------

def raw_server(endpoint_q, n_params):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint_q.put(f"tcp://127.0.0.1:{port}")
    params = np.zeros(n_params, np.float32)
    opt = make_optimizer(OptimizerSpec("momentum", 0.9), n_params)
    ack = b"\0" * 16
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            break
        grad = np.frombuffer(frames[2].buffer, np.float32)
        opt.step(params, grad, 1e-6)
        sock.send_multipart([frames[0], ack])
    sock.close(0)
    ctx.term()


def raw_client(endpoint, n_params, seconds, start_at, out_q):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    grad = np.full(n_params, 1e-3, np.float32)
    frames = encode({"type": "push", "worker_id": 0, "base_version": 0, "examples": 128}, [grad])
    while time.time() < start_at:
        time.sleep(0.001)
    count, end = 0, start_at + seconds
    while time.time() < end:
        sock.send_multipart(frames, copy=False)
        sock.recv()
        count += 1
    out_q.put(count)
    sock.close(0)
    ctx.term()


# --- psgd: the real server and protocol client ----------------------------------------------

def psgd_client(endpoint, n_params, seconds, start_at, out_q):
    client = Client(endpoint, f"bench-{os.getpid()}")
    welcome = client.request({"type": "hello", "worker": "bench", "transport": "zmq"})
    wid = welcome["worker_id"]
    grad = np.full(n_params, 1e-3, np.float32)
    version = welcome["version"]
    while time.time() < start_at:
        time.sleep(0.001)
    count, end = 0, start_at + seconds
    while time.time() < end:
        reply = client.request({"type": "push", "worker_id": wid, "base_version": version, "examples": 128}, [grad])
        if reply.type != "ack":
            raise SystemExit(f"push refused: {reply.header}")
        version = reply["version"]
        count += time.time() <= end
    out_q.put(count)
    client.close()


def shard_client(endpoints, n_params, seconds, start_at, out_q):
    clients = [Client(e, f"bench-{os.getpid()}") for e in endpoints]
    grad = np.full(n_params, 1e-3, np.float32)
    links = []
    for c in clients:
        w = c.request({"type": "hello", "worker": "bench", "transport": "zmq"})
        lo, hi = w["range"]
        links.append([c, w["worker_id"], w["version"], grad[lo:hi], lo])
    while time.time() < start_at:
        time.sleep(0.001)
    count, end = 0, start_at + seconds
    while time.time() < end:
        for c, wid, version, part, lo in links:
            c.send({"type": "push", "worker_id": wid, "base_version": version, "examples": 128}, [part], [lo])
        for link in links:
            reply = link[0].receive()
            if reply.type != "ack":
                raise SystemExit(f"push refused: {reply.header}")
            link[2] = reply["version"]
        count += time.time() <= end  # a push still in flight at the end is not counted: no bias up
    out_q.put(count)
    for c in clients:
        c.close()


def shm_shard_client(endpoints, n_params, seconds, start_at, out_q):
    """As :func:`shard_client`, through psgd's worker client over shared memory: each push
    is the worker's gradient segment of each shard's range and a doorbell; nothing of the
    gradient travels through a socket."""
    client = ParameterClient(endpoints, f"bench-{os.getpid()}", transport="shm", server_wait=60)
    client.open(client.hello(None), n_params, np.float32)
    if client.transports != ["shm"] * len(endpoints):
        raise SystemExit(f"no shared-memory path: {client.transports}")
    channels = [link.channel for link in client.links]
    versions = [0] * len(channels)
    for channel in channels:
        channel.grads[0][...] = 1e-3
    while time.time() < start_at:
        time.sleep(0.001)
    count, end = 0, start_at + seconds
    while time.time() < end:
        for k, channel in enumerate(channels):  # all shards' pushes in flight at once, as a worker's
            channel.push_begin(0, versions[k], 128, None)
        for k, channel in enumerate(channels):
            versions[k] = channel.push_end()[0]  # based on the version acked: never too stale
        count += time.time() <= end  # a push still in flight at the end is not counted: no bias up
    out_q.put(count)
    client.close()


def start_servers(layers, shards, tmp, shm=False):
    servers, endpoints = [], []
    for k in range(shards):
        ready = Path(tmp) / f"ready-{k}"
        cmd = [sys.executable, "-m", "psgd", "server", "--layers", layers, *([] if shm else ["--no-shm"]),
               "--bind", "tcp://127.0.0.1:0",
               "--ready-file", str(ready), "--optimizer", "momentum", "--lr", "1e-6", "--schedule", "constant",
               "--shard", str(k), "--num-shards", str(shards),
               # these clients send no heartbeats, and a 400 MB push queued behind 15 others
               # waits longer than the default 10 s lease: it would be refused unknown_worker
               "--lease", "600"]
        servers.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), ready))
    for server, ready in servers:
        deadline = time.time() + 60
        while not ready.exists():
            if server.poll() is not None or time.time() > deadline:
                stop_servers([s for s, _ in servers])
                raise SystemExit(f"psgd server did not start: {server.stderr.read().decode()[-1000:]}")
            time.sleep(0.02)
        endpoints.append(json.loads(ready.read_text())["endpoint"])
    return [s for s, _ in servers], endpoints


def stop_servers(servers):
    for server in servers:
        server.terminate()
    for server in servers:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def measure_shards(layers, n_params, shards, clients, seconds, transport="zmq"):
    with tempfile.TemporaryDirectory() as tmp:
        servers, endpoints = start_servers(layers, shards, tmp, shm=transport == "shm")
        try:
            return run_clients(shm_shard_client if transport == "shm" else shard_client, endpoints, n_params,
                               clients, seconds)
        finally:
            stop_servers(servers)


def run_clients(target, endpoint, n_params, clients, seconds):
    out_q = mp.Queue()
    start_at = time.time() + 0.5
    procs = [mp.Process(target=target, args=(endpoint, n_params, seconds, start_at, out_q)) for _ in range(clients)]
    for p in procs:
        p.start()
    counts = [out_q.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(30)
    return sum(counts) / seconds


def measure_raw(n_params, clients, seconds):
    q = mp.Queue()
    server = mp.Process(target=raw_server, args=(q, n_params))
    server.start()
    endpoint = q.get(timeout=30)
    try:
        return run_clients(raw_client, endpoint, n_params, clients, seconds)
    finally:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.connect(endpoint)
        s.send(b"stop")
        server.join(10)
        if server.is_alive():
            server.kill()
        s.close(0)
        ctx.term()


def measure_psgd(layers, n_params, clients, seconds):
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        cmd = [sys.executable, "-m", "psgd", "server", "--layers", layers, "--no-shm", "--bind", "tcp://127.0.0.1:0",
               "--ready-file", str(ready), "--optimizer", "momentum", "--lr", "1e-6", "--schedule", "constant"]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 30
            while not ready.exists():
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"psgd server did not start: {server.stderr.read().decode()[-1000:]}")
                time.sleep(0.02)
            endpoint = json.loads(ready.read_text())["endpoint"]
            return run_clients(psgd_client, endpoint, n_params, clients, seconds)
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


GRID_MODELS = {"0.3M": "784,384,10", "10M": "784,4096,1600,10", "100M": "784,8192,8192,3200,10"}
GRID_MEMORY_BYTES = 4e9  # of gradients in flight at once (clients x model): more does not fit beside the rest


def update_limit(size: int, seconds: float = 1.0) -> float:
    """Pushes/s of the server's essential work on ``size`` parameters: the check's dot
    product and the momentum update, nothing else."""
    params, grad = np.zeros(size, np.float32), np.full(size, 1e-3, np.float32)
    opt = make_optimizer(OptimizerSpec("momentum", 0.9), size)
    np.dot(grad, grad)
    opt.step(params, grad, 1e-6)  # untimed: the first pass faults in the pages (a server's did long before)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or count < 3:
        np.dot(grad, grad)
        opt.step(params, grad, 1e-6)
        count += 1
    return count / (time.perf_counter() - t0)


def threaded_update_limit(size: int, threads: int, seconds: float = 2.0) -> float:
    """Pushes/s of the same essential work (the check's dot product and the momentum
    update) on ``size`` parameters cut into ``threads`` contiguous chunks, each applied by
    a thread of a pool: numpy releases the GIL inside each ufunc, so the chunks can run on
    as many cores. Each chunk is a momentum optimizer over views of the same arrays (its
    own scratch block), so the result is the one-thread update's, bit for bit (the rule
    is elementwise)."""
    params, grad = np.zeros(size, np.float32), np.full(size, 1e-3, np.float32)
    velocity = np.zeros(size, np.float32)
    bounds = [size * i // threads for i in range(threads + 1)]
    chunks = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        part = make_optimizer(OptimizerSpec("momentum", 0.9), b - a)  # its own scratch: one per thread
        part.velocity = velocity[a:b]
        chunks.append((part, params[a:b], grad[a:b]))

    def apply(chunk):
        opt, p, g = chunk
        np.dot(g, g)
        opt.step(p, g, 1e-6)

    with ThreadPoolExecutor(threads) as pool:
        step = (lambda: apply(chunks[0])) if threads == 1 else (lambda: list(pool.map(apply, chunks)))
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or count < 3:
            step()
            count += 1
        return count / (time.perf_counter() - t0)


def apply_threads(args):
    """The multi-core apply table: one shard's update, 1..N threads, rounds alternated."""
    size = args.apply_size
    print(f"momentum update + finiteness check over {size:,} float32 ({size * 4 / 1e6:.0f} MB per array); "
          f"{args.seconds:g} s per measurement, {args.apply_rounds} rounds alternated; {os.cpu_count()} CPUs")
    rates = {t: [] for t in args.apply_threads}
    for _ in range(args.apply_rounds):
        for t in args.apply_threads:
            rates[t].append(threaded_update_limit(size, t, args.seconds))
    base = statistics.median(rates[args.apply_threads[0]])
    print(f"{'threads':>7} {'pushes/s':>9} {'GB/s of gradient':>17} {'vs first':>9}   (each round)")
    for t, r in rates.items():
        med = statistics.median(r)
        print(f"{t:>7} {med:9.2f} {med * size * 4 / 1e9:17.2f} {med / base:9.2f}   "
              + " ".join(f"{x:.2f}" for x in r), flush=True)


def grid(args):
    print(f"{'model':>6} {'shards':>6} {'clients':>7} {'path':>5} {'pushes/s':>9} {'GB/s/shard':>11} {'limit/s':>8} "
          f"{'limit GB/s':>11} {'ratio':>6}")
    models = {name: GRID_MODELS[name] for name in args.grid_models}
    for name, layers in models.items():
        n = MLP(ModelSpec(parse_sizes(layers))).n_params
        for shards in args.grid_shards:
            per_shard = -(-n // shards)
            limit = update_limit(per_shard)
            for clients in args.grid_clients:
                if clients * n * 4 > GRID_MEMORY_BYTES:
                    print(f"{name:>6} {shards:>6} {clients:>7}   skipped: {clients} pushes of {n * 4 / 1e6:.0f} MB "
                          f"in flight (sent and queued) need over {2 * clients * n * 4 / 1e9:.0f} GB")
                    continue
                # long enough for a few pushes of each client even at 100M parameters (~1 s each)
                seconds = max(args.seconds, 4.0 * clients * n * 4 / 1e9 * 5)
                for transport in args.grid_transport:
                    rate = measure_shards(layers, n, shards, clients, seconds, transport)
                    gb = rate * per_shard * 4 / 1e9
                    print(f"{name:>6} {shards:>6} {clients:>7} {transport:>5} {rate:9.1f} {gb:11.2f} {limit:8.1f} "
                          f"{limit * per_shard * 4 / 1e9:11.2f} {rate / limit:6.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", action="store_true", help="the model x shards x clients table instead")
    ap.add_argument("--grid-clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--grid-shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--grid-models", nargs="+", choices=list(GRID_MODELS), default=list(GRID_MODELS))
    ap.add_argument("--grid-transport", nargs="+", choices=["zmq", "shm"], default=["zmq", "shm"],
                    help="how the grid's clients push: ZeroMQ on loopback, or psgd's shared-memory path")
    ap.add_argument("--layers", default="784,1024,192,10")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--shards", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--shard-layers", default="784,4096,1600,10")
    ap.add_argument("--shard-clients", type=int, default=2)
    ap.add_argument("--apply-threads", type=int, nargs="+", default=None,
                    help="the multi-core apply table instead: one shard's update split over these thread counts")
    ap.add_argument("--apply-size", type=int, default=25_000_000)
    ap.add_argument("--apply-rounds", type=int, default=5)
    args = ap.parse_args()
    if args.apply_threads:
        print(blas_description())
        apply_threads(args)
        return
    if args.grid:
        print(blas_description())
        print(f"momentum update; {args.seconds:g} s per measurement; {os.cpu_count()} CPUs\n")
        grid(args)
        return
    n_params = MLP(ModelSpec(parse_sizes(args.layers))).n_params
    print(f"model {args.layers}: {n_params:,} parameters, {n_params * 4 / 1e6:.1f} MB per push; "
          f"momentum update; {args.seconds:g} s per measurement; {os.cpu_count()} CPUs")
    print(blas_description())
    print(f"\n{'clients':>7} {'psgd pushes/s':>14} {'limit pushes/s':>15} {'ratio':>6} {'psgd MB/s':>10}")
    for clients in args.clients:
        limit = measure_raw(n_params, clients, args.seconds)
        ours = measure_psgd(args.layers, n_params, clients, args.seconds)
        print(f"{clients:>7} {ours:14.0f} {limit:15.0f} {ours / limit:6.2f} {ours * n_params * 4 / 1e6:10.0f}", flush=True)
    print("\nlimit = the same frames into a bare ROUTER socket plus the same numpy momentum update")
    if not args.shards:
        return
    n_big = MLP(ModelSpec(parse_sizes(args.shard_layers))).n_params
    print(f"\nserver shards: model {args.shard_layers}: {n_big:,} parameters, {n_big * 4 / 1e6:.0f} MB per push, "
          f"{args.shard_clients} clients")
    print(f"{'shards':>7} {'pushes/s':>9} {'vs 1 shard':>11} {'MB/s':>7}")
    base = None
    for shards in args.shards:
        rate = measure_shards(args.shard_layers, n_big, shards, args.shard_clients, args.seconds)
        base = base or rate
        print(f"{shards:>7} {rate:9.1f} {rate / base:11.2f} {rate * n_big * 4 / 1e6:7.0f}", flush=True)


if __name__ == "__main__":
    mp.set_start_method("fork")
    main()
