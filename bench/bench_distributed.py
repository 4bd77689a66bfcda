"""Distributed K-FAC on CPU (gloo): communication volume and step time vs world size, for both
values of ``grad_worker_fraction``, under DistributedDataParallel and under FSDP2 (``fully_shard``).

    python bench/bench_distributed.py --quick     # < 1 min on 2 CPU cores
    python bench/bench_distributed.py [--worlds 1,2,3] [--wraps ddp,fsdp] [--width 256] [--steps 40]

One process per rank on 127.0.0.1, one thread each (so 3 ranks on a 2-core machine are
oversubscribed: read those times as a ceiling). Weak scaling: every rank trains on its own batch
of ``--batch`` rows, so the global batch grows with the world. The model is an MLP of
``--layers`` Linear layers of width ``--width`` (K-FAC factors of ``width + 1``), fp32, KFAC with
``factor_update_steps=1`` and ``inv_update_steps=10``.

Per step, the time is the slowest rank's (forward, backward with DDP's gradient all-reduce,
KFAC step), measured between barriers: "mean" over the timed steps (inversions amortised),
"inversion step" and "other step" the medians of each kind; "SGD step" is the same loop with
``torch.optim.SGD`` (median), in the same processes. Bytes per step are the payloads
handed to collectives, counted from the buffers (``precond.topology.comm_bytes``, and the
parameters for DDP's gradient all-reduce): "factors" (all-reduce of upper triangles, every
step), "inverses" (broadcast from the owners, inversion steps only, ``grad_worker_fraction=1``),
"gradients" (every step: under DDP with ``grad_worker_fraction=0``, the preconditioned gradients
the owners broadcast; under FSDP2, the bytes a rank sends in the gradient exchange, the
all-gather of the shards with ``1``, the all-to-alls to and from the owners with ``0``), "flags"
(finite flags, inversion status, the KL-clip sum). Every count is the mean over the ranks, as is
"inverses held", the bytes of inverses a rank keeps (``memory_usage()``). A ring
all-reduce moves about ``2(p-1)/p`` times its payload through each rank, a broadcast about once.
"framework" is the data-parallel wrapper's own payload per step, from the parameter sizes: DDP
all-reduces the gradients; FSDP2 all-gathers the parameters for the forward and again for the
backward and reduce-scatters the gradients (3x).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import kfac_ext

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INV_UPDATE_STEPS = 10
MODES = {"every rank preconditions (f=1)": 1.0, "owners precondition (f=0)": 0.0}


def make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers - 1):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, 10))


def _worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        if sys.platform == "linux":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(cfg["batch"], cfg["width"], generator=gen)
    y = torch.randint(0, 10, (cfg["batch"],), generator=gen)

    def step(net, opt) -> float:
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    def wrap(model):
        if world == 1:
            return model
        if cfg["wrap"] == "ddp":
            return nn.parallel.DistributedDataParallel(model)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    sgd_ms = None
    if cfg["baseline"]:  # the same loop with DDP + SGD-momentum: what K-FAC adds to
        net = wrap(make_model(cfg["width"], cfg["layers"]))
        sgd = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        sgd_ms = 1e3 * statistics.median([step(net, sgd) for _ in range(cfg["warmup"] + cfg["steps"])][cfg["warmup"]:])
    model = make_model(cfg["width"], cfg["layers"])
    param_bytes = sum(p.nbytes for p in model.parameters())
    net = wrap(model)
    opt = kfac_ext.KFAC(net, update="sgd", lr=0.01, momentum=0.9, loss="cross_entropy", damping=1e-2,
                        inv_update_steps=INV_UPDATE_STEPS, grad_worker_fraction=cfg["fraction"])
    precond = opt.preconditioner
    for _ in range(cfg["warmup"]):
        step(net, opt)
    topology = precond.topology
    if topology.world_size > 1:
        topology.comm_bytes = dict.fromkeys(topology.comm_bytes, 0)
    first = precond.steps
    times = [step(net, opt) for _ in range(cfg["steps"])]
    comm = {}
    held = torch.tensor([float(precond.memory_usage()["inverses"])], dtype=torch.float64)
    if topology.world_size > 1:  # the mean over the ranks
        counted = torch.tensor(list(topology.comm_bytes.values()), dtype=torch.float64)
        dist.all_reduce(counted)
        comm = {k: float(v) / (world * cfg["steps"]) for k, v in zip(topology.comm_bytes, counted)}
        dist.all_reduce(held)
        held /= world
    inversion = [t for i, t in enumerate(times) if (first + i) % INV_UPDATE_STEPS == 0]
    other = [t for i, t in enumerate(times) if (first + i) % INV_UPDATE_STEPS != 0]
    if rank == 0:
        fsdp = world > 1 and cfg["wrap"] == "fsdp"
        framework = 0 if world == 1 else 3 * param_bytes if fsdp else param_bytes
        result = dict(world=world, wrap=cfg["wrap"] if world > 1 else "none", fraction=cfg["fraction"],
                      sgd_ms=sgd_ms, mean_ms=1e3 * statistics.mean(times),
                      inversion_ms=1e3 * statistics.median(inversion) if inversion else None,
                      other_ms=1e3 * statistics.median(other), framework_bytes=framework,
                      inverses_held_bytes=float(held),
                      **{f"{k}_bytes": comm.get(k, 0.0) for k in ("factors", "inverses", "gradients", "flags")})
        Path(out).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, cfg: dict, out: Path) -> dict:
    mp.start_processes(_worker, args=(world, _free_port(), cfg, str(out)), nprocs=world, start_method="spawn")
    return json.loads(out.read_text())


def _kib(b: float) -> str:
    return f"{b / 1024:.1f}"


def markdown(rows: list[dict], cfg: dict) -> str:
    lines = [
        f"MLP {cfg['layers']} x Linear({cfg['width']}), fp32, batch {cfg['batch']} per rank, "
        f"inv_update_steps={INV_UPDATE_STEPS}, {cfg['steps']} timed steps, gloo on "
        f"{os.cpu_count()} CPU cores, 1 thread per rank",
        "",
        "| ranks | wrapper | mode | step mean (ms) | inversion step (ms) | other step (ms) | SGD step (ms) "
        "| factors KiB/step | inverses KiB/step | gradients KiB/step | flags B/step | framework KiB/step "
        "| inverses held KiB/rank |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mode = "single process" if r["world"] == 1 else next(k for k, v in MODES.items() if v == r["fraction"])
        inv = f"{r['inversion_ms']:.1f}" if r["inversion_ms"] is not None else "-"
        sgd = f"{r['sgd_ms']:.1f}" if r["sgd_ms"] is not None else "″"
        lines.append(
            f"| {r['world']} | {r['wrap']} | {mode} | {r['mean_ms']:.1f} | {inv} | {r['other_ms']:.1f} | {sgd} | "
            f"{_kib(r['factors_bytes'])} | {_kib(r['inverses_bytes'])} | {_kib(r['gradients_bytes'])} | "
            f"{r['flags_bytes']:.0f} | {_kib(r['framework_bytes'])} | {_kib(r['inverses_held_bytes'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,3")
    parser.add_argument("--wraps", default="ddp,fsdp", help="data-parallel wrappers: ddp, fsdp (FSDP2)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="width 128, 20 timed steps")
    args = parser.parse_args()
    if args.quick:
        args.width, args.steps = 128, 20
    cfg = dict(width=args.width, layers=args.layers, batch=args.batch, steps=args.steps, warmup=args.warmup)
    RESULTS_DIR.mkdir(exist_ok=True)
    rows = []
    wraps = [w for w in args.wraps.split(",") if w]
    for world in [int(w) for w in args.worlds.split(",")]:
        for wrapper in (wraps if world > 1 else wraps[:1]):
            for fraction in (MODES.values() if world > 1 else [1.0]):
                out = RESULTS_DIR / f".distributed-{world}-{wrapper}-{fraction}.json"
                rows.append(run(world, dict(cfg, wrap=wrapper, fraction=fraction, baseline=fraction == 1.0), out))
                out.unlink()
                print(f"  ranks {world}, {wrapper}, grad_worker_fraction {fraction}: {rows[-1]['mean_ms']:.1f} ms/step",
                      file=sys.stderr)
    table = markdown(rows, cfg)
    print(table)
    name = "distributed-cpu" + ("-quick" if args.quick else "")
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(dict(config=cfg, rows=rows), indent=1))
    _plot(rows, RESULTS_DIR / f"{name}.png")


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    single = [r for r in rows if r["world"] == 1]
    for wrapper in dict.fromkeys(r["wrap"] for r in rows if r["world"] > 1):
        for label, fraction in MODES.items():
            pts = single + [r for r in rows if r["world"] > 1 and r["wrap"] == wrapper and r["fraction"] == fraction]
            ax.plot([r["world"] for r in pts], [r["mean_ms"] for r in pts], "o-", label=f"{wrapper}, {label}")
    ax.set_xlabel("ranks (processes)")
    ax.set_ylabel("mean step time (ms)")
    ax.set_xticks(sorted({r["world"] for r in rows}))
    ax.legend()
    ax.set_title("Distributed K-FAC, gloo on CPU (weak scaling)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
