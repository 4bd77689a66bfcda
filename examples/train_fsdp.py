"""K-FAC with FSDP2 (`fully_shard`): parameters and gradients sharded over the ranks.

    torchrun --nproc_per_node=2 examples/train_fsdp.py

Compared with a single-process K-FAC loop, only the process-group set-up, the `fully_shard` calls
and the data sharding change. Each step the preconditioner gathers every layer's gradient whole,
preconditions it with the Kronecker factors (averaged across ranks, inversions spread over the
ranks) and writes this rank's rows back into its shard; `KFAC`'s SGD then updates the shards.
Checkpointing a sharded run is not covered yet (see the README's FSDP2 section).
"""

import argparse

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import kfac_ext
from train_ddp import init_distributed, make_model, train  # same set-up, data and loop as DDP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128, help="global batch (split over the ranks)")
    args = parser.parse_args()
    rank, world, device, use_cuda = init_distributed(args.batch)

    model = make_model(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = kfac_ext.KFAC(model, lr=0.05, momentum=0.9, loss="cross_entropy", damping=1e-2, kl_clip=1e-2)
    if rank == 0:
        print(f"{world} ranks ({'NCCL' if use_cuda else 'gloo'}), FSDP2, global batch {args.batch}")
        print(optimizer.preconditioner)
    train(model, optimizer, args.steps, args.batch, rank, world, device)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
