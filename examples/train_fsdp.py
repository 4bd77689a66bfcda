"""K-FAC with FSDP2 (`fully_shard`): parameters and gradients sharded over the ranks.

    torchrun --nproc_per_node=2 examples/train_fsdp.py --steps 60 --save /tmp/kfac.pt
    torchrun --nproc_per_node=3 examples/train_fsdp.py --steps 100 --resume /tmp/kfac.pt

Compared with a single-process K-FAC loop, only the process-group set-up, the `fully_shard` calls
and the data sharding change. Each step every layer's owner rank gathers the layer's gradient
rows, preconditions it with the Kronecker factors (averaged across ranks, inversions spread over
the ranks) and sends every rank its rows back; `KFAC`'s SGD then updates the shards. A
checkpoint (model and optimizer gathered whole, written by rank 0) resumes on any world size,
sharded or not.
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import kfac_ext
from train_ddp import init_distributed, make_model, train  # same set-up, data and loop as DDP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128, help="global batch (split over the ranks)")
    parser.add_argument("--save", help="write a checkpoint here at the end")
    parser.add_argument("--resume", help="continue from this checkpoint")
    args = parser.parse_args()
    rank, world, device, use_cuda = init_distributed(args.batch)

    model = make_model(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = kfac_ext.KFAC(model, update="sgd", lr=0.05, momentum=0.9, loss="cross_entropy", damping=1e-2, kl_clip=1e-2)
    if rank == 0:
        print(f"{world} ranks ({'NCCL' if use_cuda else 'gloo'}), FSDP2, global batch {args.batch}")
        print(optimizer.preconditioner)
    if args.resume:  # whole tensors: each rank keeps its rows
        state = torch.load(args.resume, map_location=device, weights_only=False)
        set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
        optimizer.load_state_dict(state["optimizer"])
    train(model, optimizer, args.steps, args.batch, rank, world, device, start=optimizer.preconditioner.steps)
    if args.save:  # every rank takes part in the gathers, rank 0 writes
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = dict(model=get_model_state_dict(model, options=whole), optimizer=optimizer.state_dict())
        if rank == 0:
            torch.save(state, args.save)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
