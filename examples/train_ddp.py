"""K-FAC with DistributedDataParallel: one process per GPU (NCCL) or per CPU process (gloo).

    torchrun --nproc_per_node=2 examples/train_ddp.py
    torchrun --nproc_per_node=2 examples/train_ddp.py --grad-worker-fraction 0   # owners precondition

Compared with a single-process K-FAC loop, only the process-group set-up, the DDP wrapper and
the data sharding change: the preconditioner sees the initialised process group, averages the
Kronecker factors across ranks, spreads the inversions over the ranks and keeps every rank's
parameters identical. Each rank takes an equal share of every global batch.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kfac_ext


def init_distributed(batch: int) -> tuple[int, int, torch.device, bool]:
    """The process group (NCCL with CUDA, else gloo): (rank, world size, this rank's device,
    whether it is CUDA). The global ``batch`` must split evenly over the ranks."""
    use_cuda = torch.cuda.is_available() and kfac_ext.build_info()["built_with_cuda"]
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if batch % world:
        raise SystemExit(f"--batch {batch} must be divisible by the world size {world}")
    return rank, world, device, use_cuda


def synthetic_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Your data here: the same synthetic set on every rank (a random teacher labels it)."""
    data = torch.Generator().manual_seed(0)
    images = torch.randn(4096, 1, 8, 8, generator=data)
    labels = (images.flatten(1) @ torch.randn(64, 10, generator=data)).argmax(1)
    return images, labels


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same initial parameters on every rank
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    ).to(device)


def train(model: nn.Module, optimizer: kfac_ext.KFAC, steps: int, batch: int, rank: int, world: int,
          device: torch.device, start: int = 0) -> None:
    """K-FAC steps ``start`` to ``steps - 1``; every rank draws the same global batch and takes
    its slice of it. Rank 0 prints the loss averaged over the ranks every 20 steps."""
    images, labels = synthetic_data()
    per_rank = batch // world
    for step in range(start, steps):
        chosen = torch.randint(0, len(images), (batch,), generator=torch.Generator().manual_seed(step))
        mine = chosen[rank * per_rank:(rank + 1) * per_rank]
        x, y = images[mine].to(device), labels[mine].to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # the wrapper averages the gradients (DDP) or reduce-scatters them (FSDP2)
        optimizer.step()  # factors averaged, inversions spread, same update on every rank
        if step % 20 == 0 or step == steps - 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step:3d}  loss {mean_loss.item() / world:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128, help="global batch (split over the ranks)")
    parser.add_argument("--grad-worker-fraction", type=float, default=1.0,
                        help="1: inverses broadcast, every rank preconditions every layer; "
                             "< 1: each layer's owner preconditions it and broadcasts the result")
    parser.add_argument("--checkpoint", default="/tmp/kfac_ddp_checkpoint.pt")
    args = parser.parse_args()
    rank, world, device, use_cuda = init_distributed(args.batch)

    model = DistributedDataParallel(make_model(device), device_ids=[device.index] if use_cuda else None)
    optimizer = kfac_ext.KFAC(model, update="sgd", lr=0.05, momentum=0.9, loss="cross_entropy", damping=1e-2,
                              kl_clip=1e-2, grad_worker_fraction=args.grad_worker_fraction)
    if rank == 0:
        print(f"{world} ranks ({'NCCL' if use_cuda else 'gloo'}), global batch {args.batch}")
        print(optimizer.preconditioner)
    train(model, optimizer, args.steps, args.batch, rank, world, device)

    # Factors, inverses and statistics are the same on every rank: rank 0's checkpoint (names
    # without DDP's "module." prefix) loads into a run on any number of processes, even one.
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}, args.checkpoint)
        print(f"saved {args.checkpoint}; stats {optimizer.preconditioner.stats}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
