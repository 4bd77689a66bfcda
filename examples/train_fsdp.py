"""K-FAC with FSDP2 (`fully_shard`): parameters and gradients sharded over the ranks.

    torchrun --nproc_per_node=2 examples/train_fsdp.py

Compared with a single-process K-FAC loop, only the process-group set-up, the `fully_shard` calls
and the data sharding change. Each step the preconditioner gathers every layer's gradient whole,
preconditions it with the Kronecker factors (averaged across ranks, inversions spread over the
ranks) and writes this rank's rows back into its shard; `KFAC`'s SGD then updates the shards.
Checkpointing a sharded run is not covered yet (see the README's FSDP2 section).
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import kfac_ext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128, help="global batch (split over the ranks)")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available() and kfac_ext.build_info()["built_with_cuda"]
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the world size {world}")
    mesh = init_device_mesh(device.type, (world,))

    # Your data here: the same synthetic set on every rank (a random teacher labels it).
    data = torch.Generator().manual_seed(0)
    images = torch.randn(4096, 1, 8, 8, generator=data)
    labels = (images.flatten(1) @ torch.randn(64, 10, generator=data)).argmax(1)

    torch.manual_seed(0)  # the same initial parameters on every rank, before sharding
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    ).to(device)
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = kfac_ext.KFAC(model, lr=0.05, momentum=0.9, loss="cross_entropy", damping=1e-2, kl_clip=1e-2)
    if rank == 0:
        print(f"{world} ranks ({'NCCL' if use_cuda else 'gloo'}), FSDP2, global batch {args.batch}")
        print(optimizer.preconditioner)

    per_rank = args.batch // world
    for step in range(args.steps):
        # Every rank draws the same global batch and takes its slice of it.
        batch = torch.randint(0, len(images), (args.batch,), generator=torch.Generator().manual_seed(step))
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        x, y = images[mine].to(device), labels[mine].to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # FSDP2 reduce-scatters the gradients into the shards
        optimizer.step()
        if step % 20 == 0 or step == args.steps - 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step:3d}  loss {mean_loss.item() / world:.4f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
