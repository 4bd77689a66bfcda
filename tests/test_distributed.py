"""Distributed K-FAC (kfac_ext.topology) on CPU with gloo: spawned ranks vs one process.

Every scenario trains the same float64 MLP for a few steps with ``KFAC``. With ``world`` ranks,
rank ``r`` takes rows ``[r·B/world, (r+1)·B/world)`` of each step's global batch of ``B`` (the
"unequal" scenario splits it unevenly); the reference is one process (no process group) on the
whole batch. The ranks of one world size
run all their scenarios in a single spawn (start-up dominates the cost), write what they saw
after every step to files, and the tests compare: factors, preconditioned gradients and
parameters within 1e-6 relative of the reference, bitwise equal across ranks.
"""

from __future__ import annotations

import datetime
import functools
import os
import random
import socket
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from golden import Golden
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from kfac_ext import KFAC, KFACPreconditioner, Status
from kfac_ext import topology as kd
from kfac_ext.fsdp import whole
from kfac_ext.inverse import Inverse

B = 12  # global batch: divisible by 2 and 3
TOL = 1e-6
F64 = torch.float64


def mlp(inplace: bool = False, classes: int = 3) -> nn.Module:
    """Factor sizes all differ (A: 5, 10, 7; G: 9, 6, 3), so a factor is known by its size.
    ``inplace``: the first activation is ``ReLU(inplace=True)``, which modifies the first
    layer's output (as in torchvision's ResNets and VGGs). ``classes``: outputs (G of the last
    layer)."""
    torch.manual_seed(0)
    first = nn.ReLU(inplace=True) if inplace else nn.Tanh()
    return nn.Sequential(nn.Linear(4, 9), first, nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, classes)).double()


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, 4, generator=g, dtype=F64), torch.randint(0, 3, (B,), generator=g)


def gpt2() -> nn.Module:
    """Hugging Face GPT-2 from a tiny config, float64, no dropout: Conv1D layers (weights stored
    ``[in, out]``, so FSDP2 shards W̄'s columns), a position embedding (diagonal A, rows
    sharded), a tied ``lm_head``, ``[B, T, V]`` logits."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=12, n_head=2, vocab_size=20, n_positions=8, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).double()


def tokens(step: int) -> torch.Tensor:
    """``B`` sequences of 7 tokens, no padding: every rank's loss is the mean over equally many
    tokens, so the mean of the ranks' means is the whole batch's."""
    return torch.randint(0, 20, (B, 7), generator=torch.Generator().manual_seed(200 + step))


def resnet18() -> nn.Module:
    """torchvision's ResNet-18, float64: every convolution's output goes through BatchNorm and
    ``ReLU(inplace=True)``, and each residual sum is taken in place."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).double()


def images(step: int) -> torch.Tensor:
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(300 + step), dtype=F64)


def model_of(spec: dict) -> nn.Module:
    if spec.get("model") == "gpt2":
        return gpt2()
    if spec.get("model") == "resnet18":
        return resnet18()
    return mlp(spec.get("inplace", False), spec.get("classes", 3))


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` wraps before the root: each Linear of the MLP, each GPT-2
    block, each ResNet stage."""
    if isinstance(model, nn.Sequential):
        return [layer for layer in model if isinstance(layer, nn.Linear)]
    if hasattr(model, "transformer"):
        return list(model.transformer.h)
    return [model.layer1, model.layer2, model.layer3, model.layer4]


def kfac_args(mode: str | None, inversion: str, fisher_type: str, **extra) -> dict:
    """``mode`` None: the default ``grad_worker_fraction`` (0 under FSDP2, else 1)."""
    if mode is not None:
        extra["grad_worker_fraction"] = 1.0 if mode == "a" else 0.0
    return dict(lr=0.1, momentum=0.9, loss="cross_entropy", fisher_type=fisher_type, inversion=inversion,
                damping=1e-2, inv_update_steps=2, factor_dtype=F64, inv_dtype=F64, **extra)


def eigen_adam_args(mode: str | None) -> dict:
    """KFAC's defaults (update="eigen-adam", empirical factors), inverses every 2 steps."""
    args = kfac_args(mode, "eigen", "type-2", weight_decay=0.01)
    del args["momentum"], args["damping"]
    return {**args, "update": "eigen-adam", "fisher_type": "empirical", "lr": 1e-2}


# name -> spec. mode "a": inverses broadcast (grad_worker_fraction=1); "b": owners precondition
# and broadcast the result (grad_worker_fraction=0). wrap: "ddp" or "manual" (an unwrapped model,
# gradients all-reduced by hand).
SCENARIOS = {
    "a-eigen-type2": dict(kfac=kfac_args("a", "eigen", "type-2", kl_clip=1e-2), wrap="ddp", steps=4),
    "b-cholesky-empirical": dict(kfac=kfac_args("b", "cholesky", "empirical"), wrap="ddp", steps=4),
    "a-cholesky-empirical-manual": dict(kfac=kfac_args("a", "cholesky", "empirical"), wrap="manual", steps=4),
    "b-eigen-type2": dict(kfac=kfac_args("b", "eigen", "type-2", kl_clip=1e-2), wrap="ddp", steps=4),
    # A NaN in the last rank's input at step 2: NaN gradients everywhere (DDP), every rank skips
    # both the factor update and the step.
    "nan-input": dict(kfac=kfac_args("a", "eigen", "type-2"), wrap="ddp", steps=4, nan_input=2),
    # A non-finite activation captured on the last rank only at step 1 (gradients finite): every
    # rank skips the factor update, the step goes on.
    "nan-statistics": dict(kfac=kfac_args("b", "cholesky", "empirical"), wrap="ddp", steps=4, nan_statistics=1),
    # The inversion of the 9x9 factor (layer 0's G: rank 1 owns it) fails at step 2: every rank
    # keeps the previous inverse.
    "fail-a": dict(kfac=kfac_args("a", "eigen", "type-2"), wrap="ddp", steps=4, fail=(2, 9)),
    "fail-b": dict(kfac=kfac_args("b", "cholesky", "type-2"), wrap="ddp", steps=4, fail=(2, 9)),
    # Rank 0 saves after 3 steps (step 3 is no inversion step: the saved inverses are used), and,
    # for mode b, after 4 (step 4 is one: the inverses rank 0 does not hold are recomputed).
    "ckpt-a": dict(kfac=kfac_args("a", "eigen", "type-2"), wrap="ddp", steps=6, save_after=3),
    "ckpt-b": dict(kfac=kfac_args("b", "cholesky", "type-2"), wrap="ddp", steps=6, save_after=4),
    # Monte Carlo targets: every rank samples its own (seed + rank), so no single-process twin
    # on the whole batch; test_mc_factors_average_each_ranks_own_samples checks the factors.
    "mc": dict(kfac=kfac_args("b", "eigen", "mc"), wrap="ddp", steps=3, reference=False),
    # Two micro-batches per step on every rank (one process: two halves of the whole batch): each
    # goes into the rank's factors as the next begins, no flag agreed between them; the average at
    # step() gives every rank, and the one process, the whole batch's factors.
    "accumulate": dict(kfac=kfac_args("a", "eigen", "type-2", grad_accumulation_steps=2), wrap="ddp", steps=4,
                       accumulate=2, golden=False),
    # process_group=: only ranks 1 and 2 of 3 train (group ranks 0 and 1; rank 2 owns things).
    "subgroup": dict(kfac=kfac_args("b", "eigen", "type-2"), wrap="manual", steps=4, group=[1, 2]),
    # FSDP2 (fully_shard on each Linear and the root): parameters and gradients are row shards
    # (the 9-row layer splits 5/4 on 2 ranks); mode "a" all-gathers the gradients and every rank
    # keeps its rows of the result, mode "b" (the default under FSDP2) sends each layer's rows to
    # its owner and the owner sends the result's rows back; KFAC's SGD updates the local shards.
    "fsdp-a-eigen-type2": dict(kfac=kfac_args("a", "eigen", "type-2", kl_clip=1e-2), wrap="fsdp", steps=4),
    "fsdp-b-cholesky-empirical": dict(kfac=kfac_args("b", "cholesky", "empirical"), wrap="fsdp", steps=4),
    "fsdp-nan-input": dict(kfac=kfac_args(None, "eigen", "type-2"), wrap="fsdp", steps=4, nan_input=2),
    "fsdp-mc": dict(kfac=kfac_args("b", "eigen", "mc"), wrap="fsdp", steps=3, reference=False),
    # ReLU(inplace=True) modifies the first layer's output: the sampled backward still reaches it.
    # The default grad_worker_fraction: owners gather, precondition and scatter.
    "fsdp-inplace-type2": dict(kfac=kfac_args(None, "cholesky", "type-2", kl_clip=1e-2), wrap="fsdp", steps=3,
                               inplace=True),
    # Saved by the sharded run after 3 steps (parameters and momentum gathered whole), resumed on
    # one process and on 2 ranks.
    "fsdp-ckpt": dict(kfac=kfac_args("a", "eigen", "type-2"), wrap="fsdp", steps=6, save_after=3),
    # The 2-rank "fsdp-ckpt" checkpoint resumed by 3 sharded ranks, owners preconditioning (the
    # default grad_worker_fraction under FSDP2).
    "fsdp-resume": dict(kfac=kfac_args(None, "eigen", "type-2"), wrap="fsdp", steps=6, resume="fsdp-ckpt",
                        reference=False),
    # Adaptive damping every 2 steps: every rank averages the loss over the ranks, so all adapt
    # the damping alike, as one process does on the whole batch (FSDP2: each block's quadratic
    # model term from its owner, summed).
    "adaptive": dict(kfac=kfac_args("a", "eigen", "type-2", adaptive_damping=True, adaptive_damping_interval=2),
                     wrap="ddp", steps=5),
    "fsdp-adaptive": dict(kfac=kfac_args(None, "cholesky", "type-2", adaptive_damping=True,
                                         adaptive_damping_interval=2), wrap="fsdp", steps=5),
    # 2 outputs on 3 ranks: the last layer's rows split 1/1/0, rank 2's shards are empty.
    "fsdp-empty-shard": dict(kfac=kfac_args(None, "eigen", "type-2", kl_clip=1e-2), wrap="fsdp", steps=3,
                             classes=2),
    # A real model: Hugging Face GPT-2, each block and the root sharded.
    "fsdp-gpt2": dict(kfac=kfac_args(None, "eigen", "type-2", kl_clip=1e-2), wrap="fsdp", steps=3, model="gpt2"),
    # torchvision ResNet-18 under Monte Carlo, 4-D convolution weights sharded by output
    # channel (BatchNorm uses each rank's own batch statistics, so there is no single-process
    # twin). Factors above 600 (the 3x3 convolutions from layer2 on: A up to 4609) are left to
    # SGD to keep the test fast.
    "fsdp-resnet18": dict(kfac=kfac_args(None, "eigen", "mc", kl_clip=1e-2, max_factor_dim=600), wrap="fsdp",
                          steps=2, model="resnet18", reference=False),
    # MixedPrecisionPolicy(param_dtype=bf16): bf16 forward and backward, float32 factors.
    "fsdp-bf16": dict(kfac={**kfac_args(None, "eigen", "type-2"), "factor_dtype": torch.float32,
                            "inv_dtype": torch.float32}, wrap="fsdp", steps=4, bf16=True, reference=False),
    # Unequal per-rank batches (split: the row bounds per world size, 4 + 8 rows on 2 ranks,
    # 2 + 3 + 7 on 3): each rank's statistics are its own batch's (A over its rows, G with
    # w = 1/M of its own loss) and the factors their mean over the ranks (module docstring of
    # kfac_ext.topology), not the whole batch's; so there is no single-process twin, and
    # test_unequal_batches_average_each_ranks_own_statistics checks the factors. Recorded after
    # the golden values were (golden=False).
    "unequal": dict(kfac=kfac_args("a", "eigen", "type-2"), wrap="ddp", steps=3, split={2: [0, 4, 12], 3: [0, 2, 5, 12]},
                    reference=False, golden=False),
    # KFAC's default rule, Adam in the eigenbasis (its moments kept by the rank that
    # preconditions a block; under FSDP2 the moves are on the local shards): every mode.
    "eigen-adam-a": dict(kfac=eigen_adam_args("a"), wrap="ddp", steps=5, golden=False),
    "eigen-adam-b": dict(kfac=eigen_adam_args("b"), wrap="ddp", steps=5, golden=False),
    "fsdp-eigen-adam-a": dict(kfac=eigen_adam_args("a"), wrap="fsdp", steps=5, golden=False),
    "fsdp-eigen-adam": dict(kfac=eigen_adam_args(None), wrap="fsdp", steps=5, golden=False),
    # inv_update_steps="auto" with a block whose decompositions outweigh its layer (the last
    # Linear, 40 outputs over a few rows per rank): ranks with unequal batches must still agree
    # on which factors each step refreshes (no single-process twin: the budget is per rank).
    "auto-sparse-a": dict(kfac={**eigen_adam_args("a"), "inv_update_steps": "auto"}, wrap="ddp", steps=6, classes=40,
                          split={2: [0, 4, 12], 3: [0, 2, 5, 12]}, reference=False, golden=False),
    "auto-sparse-b": dict(kfac={**eigen_adam_args("b"), "inv_update_steps": "auto"}, wrap="ddp", steps=6, classes=40,
                          reference=False, golden=False),
}
RUNS = {
    2: ["a-eigen-type2", "b-cholesky-empirical", "nan-input", "nan-statistics", "fail-a", "fail-b",
        "ckpt-a", "ckpt-b", "mc", "fsdp-a-eigen-type2", "fsdp-b-cholesky-empirical", "fsdp-nan-input",
        "fsdp-mc", "fsdp-bf16", "fsdp-ckpt", "fsdp-inplace-type2", "adaptive", "fsdp-adaptive", "fsdp-gpt2",
        "fsdp-resnet18", "unequal", "accumulate", "eigen-adam-a", "eigen-adam-b", "fsdp-eigen-adam-a", "fsdp-eigen-adam",
        "auto-sparse-a", "auto-sparse-b"],
    3: ["a-cholesky-empirical-manual", "b-eigen-type2", "subgroup", "fsdp-a-eigen-type2", "fsdp-inplace-type2",
        "fsdp-resume", "fsdp-adaptive", "fsdp-gpt2", "fsdp-empty-shard", "unequal", "eigen-adam-b", "fsdp-eigen-adam",
        "auto-sparse-a"],
}


def rows_of(spec: dict, rank: int, world: int) -> slice:
    """Rank ``rank``'s rows of each step's global batch: equal shares, or the spec's ``split``."""
    bounds = spec.get("split", {}).get(world) if world > 1 else None
    if bounds is None:
        return slice(rank * B // world, (rank + 1) * B // world)
    return slice(bounds[rank], bounds[rank + 1])


class FailingInversion:
    """Wraps the ops module: while ``armed``, the inversion of every factor of size ``dim``
    reports ``FAILED`` with an all-zero result, as the native ops do."""

    def __init__(self, ops, dim: int):
        self._ops, self.dim, self.armed = ops, dim, False

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def _fail(self, factors, outputs, status) -> None:
        for i, f in enumerate(factors):
            if self.armed and f.shape[0] == self.dim:
                status[i] = int(Status.FAILED)
                for out in outputs:
                    out[i].zero_()

    def eigen_decompose(self, factors):
        values, vectors, status = self._ops.eigen_decompose(factors)
        self._fail(factors, (values, vectors), status)
        return values, vectors, status

    def damped_inverse(self, factors, damping):
        inverses, status = self._ops.damped_inverse(factors, damping)
        self._fail(factors, (inverses,), status)
        return inverses, status


def train(spec: dict, rank: int = 0, world: int = 1, *, checkpoint: str | None = None,
          resume: str | None = None, group=None) -> list[dict]:
    """Runs ``spec`` on this rank; returns per step the parameters, the preconditioned gradients,
    the factors and the stats after the step. ``resume``: load that checkpoint first and run
    the remaining steps."""
    model = model_of(spec)
    net = model
    if world > 1 and spec["wrap"] == "ddp":
        net = nn.parallel.DistributedDataParallel(model)
    sharded = spec["wrap"] == "fsdp" and dist.is_initialized()  # FSDP2 on one rank too
    if sharded:
        mesh = init_device_mesh("cpu", (world,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if spec.get("bf16") else MixedPrecisionPolicy()
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = KFAC(net, **{"update": "sgd", **spec["kfac"]}, process_group=group)
    precond = opt.preconditioner
    first = 0
    if resume is not None:
        state = torch.load(resume, weights_only=False)
        if sharded:  # whole tensors into the shards
            set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        first = precond.steps
    failing = None
    if "fail" in spec:
        failing = precond.ops = FailingInversion(precond.ops, spec["fail"][1])
    rows = rows_of(spec, rank, world)
    records = []
    with warnings.catch_warnings(record=True) as messages:
        warnings.simplefilter("always")
        for step in range(first, spec["steps"]):
            if spec.get("model") == "gpt2":
                ids = tokens(step)[rows]
                # positions per example: with GPT-2's own [1, T] position ids the position
                # embedding's output gradient is summed over the batch before K-FAC sees it
                positions = torch.arange(ids.shape[1]).expand_as(ids)

                def loss_fn():
                    return net(input_ids=ids, position_ids=positions, labels=ids).loss
            else:
                x, y = global_batch(step)
                y = y % spec.get("classes", 3)
                if spec.get("model") == "resnet18":
                    x = images(step)
                if spec.get("nan_input") == step:
                    x[-1, 0] = float("nan")  # the last row: the last rank's
                x, y = x[rows], y[rows]

                def loss_fn():
                    return F.cross_entropy(net(x), y)

            def closure():
                opt.zero_grad()
                if spec.get("accumulate", 1) == 1:
                    loss = loss_fn()
                    loss.backward()
                    return loss
                k = spec["accumulate"]
                total = 0.0
                for xm, ym in zip(x.chunk(k), y.chunk(k)):
                    loss = F.cross_entropy(net(xm), ym) / k
                    loss.backward()
                    total = total + loss.detach()
                return total

            adaptive = spec["kfac"].get("adaptive_damping", False)
            if not adaptive:  # else KFAC.step runs the closure
                closure()
            if world > 1 and spec["wrap"] == "manual":
                for p in model.parameters():
                    dist.all_reduce(p.grad, group=group)
                    p.grad.div_(world)
            if spec.get("nan_statistics") == step and rank == world - 1:
                name = precond.blocks[0].name
                pending = precond.capture.pending_a
                pending[name][0] = torch.full_like(pending[name][0], float("inf"))
            if failing is not None:
                failing.armed = step == spec["fail"][0]
            opt.step(closure if adaptive else None)
            records.append(dict(
                params=[whole(p.detach()).clone() for p in model.parameters()],
                grads=[whole(p.grad).clone() for p in model.parameters()],
                factors={k: (a.clone(), g.clone()) for k, (a, g) in precond.factors().items()},
                inverses=held_inverses(precond),
                stats=dict(precond.stats),
                damping=precond.damping,
            ))
            if checkpoint is not None and step + 1 == spec.get("save_after"):
                # every rank takes part (FSDP2 gathers the shards); rank 0 writes
                state = dict(model={k: whole(v) for k, v in model.state_dict().items()}, optimizer=opt.state_dict())
                if rank == 0:
                    torch.save(state, checkpoint)
    records[-1]["warnings"] = [str(m.message) for m in messages if "KFACPreconditioner" in str(m.message)]
    records[-1]["comm_bytes"] = dict(precond.topology.comm_bytes)
    records[-1]["refreshes"] = (precond.refresh_period, dict(precond.sparse_refresh))
    return records


def held_inverses(precond: KFACPreconditioner) -> dict[tuple[str, str], torch.Tensor]:
    """``{(layer, "A" | "G"): inverse}`` of the factors whose damped inverse this rank holds as a
    matrix (the Cholesky and eigen-with-factored-damping forms; not eigenvectors, whose signs
    are arbitrary, nor the layers another rank owns)."""
    return {(name, side): record.matrix.clone() for name, sides in precond.inverses.records.items()
            for side, record in zip("AG", sides) if isinstance(record, Inverse)}


def _worker(rank: int, world: int, port: int, out_dir: str, checkpoints: str) -> None:
    torch.set_num_threads(1)
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # 127.0.0.1 only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out = {}
        for name in RUNS[world]:
            spec = SCENARIOS[name]
            ckpt = os.path.join(out_dir, f"{name}.ckpt") if "save_after" in spec else None
            if "resume" in spec:
                out[name] = train(spec, rank, world, resume=os.path.join(checkpoints, f"{spec['resume']}.ckpt"))
            elif "group" in spec:
                group = dist.new_group(spec["group"])  # every rank takes part in creating it
                if rank in spec["group"]:
                    out[name] = train(spec, spec["group"].index(rank), len(spec["group"]), group=group)
            else:
                out[name] = train(spec, rank, world, checkpoint=ckpt)
            dist.barrier()
        out["refusal"] = refusals(world)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def refusals(world: int) -> list[str]:
    """The errors of KFAC on a model whose first layer alone is sharded, and on a sharded
    ``nn.MultiheadAttention`` (q/k/v blocks share ``in_proj_weight``)."""
    messages = []
    mesh = init_device_mesh("cpu", (world,))
    partly = mlp()
    fully_shard(partly[0], mesh=mesh)
    attention = SelfAttention().double()
    fully_shard(attention, mesh=mesh)
    for model in (partly, attention):
        try:
            KFAC(model, update="sgd", loss="cross_entropy")
            messages.append("accepted")
        except (ValueError, NotImplementedError) as e:
            messages.append(str(e))
    return messages


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, out_dir, checkpoints) -> dict[str, list[list[dict]]]:
    """``checkpoints``: the folder of the checkpoints to resume from (an earlier world's)."""
    mp.start_processes(_worker, args=(world, _free_port(), str(out_dir), str(checkpoints)), nprocs=world,
                       start_method="spawn")
    per_rank = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return {name: [out[name] for out in per_rank if name in out] for name in RUNS[world] + ["refusal"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{world: {scenario: [records of rank 0, rank 1, ...]}}`` and the checkpoint folder."""
    out = {}
    dirs = {}
    for world in RUNS:  # world 2 first: world 3 resumes its checkpoints
        dirs[world] = tmp_path_factory.mktemp(f"world{world}")
        out[world] = _spawn(world, dirs[world], dirs[2])
    return out, dirs


@functools.cache
def reference(name: str) -> list[dict]:
    torch.manual_seed(0)
    return train(SCENARIOS[name])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-300))


def assert_close(got: dict, want: dict, where: str) -> None:
    for i, (p, q) in enumerate(zip(got["params"], want["params"])):
        assert rel(p, q) < TOL, f"{where}: parameter {i}"
    for i, (p, q) in enumerate(zip(got["grads"], want["grads"])):
        assert rel(p, q) < TOL, f"{where}: preconditioned gradient {i}"
    assert got["factors"].keys() == want["factors"].keys(), where
    for k in want["factors"]:
        for side, p, q in zip("AG", got["factors"][k], want["factors"][k]):
            assert rel(p, q) < TOL, f"{where}: factor {side} of layer {k}"
            assert p.dim() == 1 or torch.equal(p, p.mT), f"{where}: factor {side} of layer {k} not exactly symmetric"
    for key, inverse in got["inverses"].items():  # every rank holds some, the reference all
        assert rel(inverse, want["inverses"][key]) < TOL, f"{where}: inverse of {key}"
    assert got["stats"] == pytest.approx(want["stats"]), where
    assert got["damping"] == pytest.approx(want["damping"], rel=TOL), where


def assert_ranks_identical(per_rank: list[list[dict]], name: str) -> None:
    for step, records in enumerate(zip(*per_rank)):
        first = records[0]
        for r, rec in enumerate(records[1:], 1):
            for key in ("params", "grads"):
                for p, q in zip(rec[key], first[key]):
                    assert torch.equal(p, q), f"{name} step {step}: {key} of rank {r} differ from rank 0"
            for k in first["factors"]:
                for p, q in zip(rec["factors"][k], first["factors"][k]):
                    assert torch.equal(p, q), f"{name} step {step}: factors of {k} on rank {r}"
            assert rec["stats"] == first["stats"], f"{name} step {step}: stats of rank {r}"
            assert rec.get("warnings") == first.get("warnings"), f"{name}: warnings of rank {r}"


# ---- equivalence with one process --------------------------------------------------------


@pytest.mark.parametrize("world,name", [(w, n) for w, names in RUNS.items() for n in names])
def test_ranks_match_single_process_and_each_other(runs, world, name):
    per_rank = runs[0][world][name]
    assert_ranks_identical(per_rank, name)
    assert len(per_rank) == len(SCENARIOS[name].get("group", range(world)))
    if not SCENARIOS[name].get("reference", True):
        return
    want = reference(name)
    for r, records in enumerate(per_rank):
        assert len(records) == len(want)
        for step, (got, ref) in enumerate(zip(records, want)):
            assert_close(got, ref, f"{name}, world {world}, rank {r}, step {step}")
        for rec in records:
            assert all(torch.isfinite(p).all() for p in rec["params"])
        assert records[-1]["warnings"] == want[-1]["warnings"]
        comm = records[-1]["comm_bytes"]
        shares_gradients = SCENARIOS[name]["kfac"].get("grad_worker_fraction", 0.0) < 1
        fsdp = SCENARIOS[name]["wrap"] == "fsdp"
        assert comm["factors"] > 0 and comm["flags"] > 0
        assert (comm["gradients"] > 0, comm["inverses"] > 0) == (shares_gradients or fsdp, not shares_gradients)
    if fsdp:
        # Per step, summed over the ranks: every rank sends its padded pieces (ceil(rows / p)
        # rows of each gradient) to the p - 1 others (all-gather), or to each layer's owner,
        # which sends every other rank its piece back: 2 (p - 1) pieces in all (a step whose
        # gradients are not finite sends nothing back).
        blocks = KFACPreconditioner(model_of(SCENARIOS[name]), loss="cross_entropy").blocks
        pieces = sum(-(-p.shape[0] // world) * p[0].numel() for b in blocks for p in b.params()) * 8
        sent = sum(records[-1]["comm_bytes"]["gradients"] for records in per_rank)
        # Adaptive damping sends each adaptive step's parameter changes the same way, once.
        kfac = SCENARIOS[name]["kfac"]
        adaptive = len(range(0, len(want), kfac["adaptive_damping_interval"])) if kfac.get("adaptive_damping") else 0
        if shares_gradients:
            skipped = per_rank[0][-1]["stats"]["nonfinite_grad_steps"]
            assert sent == (2 * len(want) - skipped + adaptive) * (world - 1) * pieces
        else:
            assert sent == (len(want) + adaptive) * world * (world - 1) * pieces


@pytest.fixture(scope="module")
def golden():
    g = Golden("distributed")
    yield g
    g.save()


@pytest.mark.parametrize("world,name", [(w, n) for w, names in RUNS.items() for n in names
                                        if SCENARIOS[n].get("golden", True)])
def test_scenarios_match_golden(runs, golden, world, name):
    """Every scenario's parameters, factors and statistics on rank 0 after its last step, as the
    code before the preconditioner's split computed them (tests/golden.py)."""
    last = runs[0][world][name][0][-1]
    golden.check(f"world{world}-{name}", dict(params=last["params"], factors=last["factors"], stats=last["stats"]),
                 computed_in=least_precise_dtype(SCENARIOS[name]))


def least_precise_dtype(spec: dict) -> torch.dtype | None:
    """The least precise dtype a scenario's results went through: bfloat16 for bf16 forwards;
    float32 for GPT-2, whose Hugging Face causal-LM loss casts the float64 model's logits to
    float32 (transformers/loss/loss_utils.py), so that the rounding of any float64 op upstream
    (a GEMM blocked another way) moves its results by ~1e-9."""
    if spec.get("bf16"):
        return torch.bfloat16
    return torch.float32 if spec.get("model") == "gpt2" else None


def _single_process_factors(records: list[dict], name: str, rows: list[slice], seeds: list[int]) -> list[dict]:
    """Scenario ``name``'s factors after each step as single processes see them: process ``r``
    sees ``rows[r]`` of each step's global batch with Monte Carlo seed ``seeds[r]`` and, before
    each step, the parameters the distributed run had (``records``: a rank's records); its
    factors are averaged over the processes (the EMA is linear and starts from the first step's
    statistics, so averaging the per-process averages is averaging the statistics)."""
    spec = SCENARIOS[name]["kfac"]
    per_process = []
    for r, seed in zip(range(len(rows)), seeds):
        model = mlp()
        precond = KFACPreconditioner(model, loss=spec["loss"], fisher_type=spec["fisher_type"], seed=seed,
                                     factor_dtype=F64, inv_dtype=F64)
        steps = []
        for step in range(len(records)):
            if step > 0:
                with torch.no_grad():
                    for p, q in zip(model.parameters(), records[step - 1]["params"]):
                        p.copy_(q)
            x, y = global_batch(step)
            model.zero_grad()
            F.cross_entropy(model(x[rows[r]]), y[rows[r]]).backward()
            precond.step()
            steps.append({k: (a.clone(), g.clone()) for k, (a, g) in precond.factors().items()})
        per_process.append(steps)
    return [{k: tuple(sum(p[step][k][side] for p in per_process) / len(rows) for side in range(2))
             for k in per_process[0][step]} for step in range(len(records))]


def _mc_factors_per_rank(records: list[dict], world: int, seeds: list[int]) -> list[dict]:
    """The "mc" scenarios' factors from single processes, process ``r`` on rank ``r``'s rows with
    seed ``seeds[r]`` (_single_process_factors)."""
    rows = [rows_of(SCENARIOS["mc"], r, world) for r in range(world)]
    return _single_process_factors(records, "mc", rows, seeds)


@pytest.mark.parametrize("name", ["mc", "fsdp-mc"])
def test_mc_factors_average_each_ranks_own_samples(runs, name):
    """With Monte Carlo targets every rank draws its own samples (generator seed + rank): the
    distributed factors after each step are the single-process factors of rank r's rows with
    seed r, averaged over the ranks. Had every rank drawn the same samples (seed 0 everywhere),
    G would be another matrix (by ~13% here).

    Tolerance: float64 sums of 6 rows per rank, averaged over 2 ranks and an EMA over 3 steps,
    in another order: each entry is off by <= ~11 eps relative to the sum of its terms' sizes,
    and for a positive semidefinite Gram matrix ``XᵀX`` those sizes total ``|X|² <= √d·|XᵀX|``
    (d <= 10 here): <= 11·√10·eps ≈ 8e-15; 1e-13 (measured: 2e-16)."""
    world = 2
    records = runs[0][world][name][0]
    own = _mc_factors_per_rank(records, world, seeds=list(range(world)))
    same = _mc_factors_per_rank(records, world, seeds=[0] * world)
    for step, (record, want, shared) in enumerate(zip(records, own, same)):
        assert record["factors"].keys() == want.keys()
        for k, (a, g) in record["factors"].items():
            assert rel(a, want[k][0]) < 1e-13, f"step {step}: A of layer {k}"
            assert rel(g, want[k][1]) < 1e-13, f"step {step}: G of layer {k}"
            assert rel(g, shared[k][1]) > 1e-2, f"step {step}: G of layer {k} as if all ranks drew rank 0's samples"


@pytest.mark.parametrize("world,name,period", [(2, "auto-sparse-a", 2300), (3, "auto-sparse-a", 3450),
                                               (2, "auto-sparse-b", 2300)])
def test_auto_refresh_budget_is_the_mean_over_the_ranks(runs, world, name, period):
    """inv_update_steps="auto" weighs the decompositions against each layer's work averaged over
    the ranks, so that every rank refreshes the same factors at the same steps although their
    rows differ (4 and 8; 2, 3 and 7): the last Linear (A 7, G 40) over 12 / world rows on
    average costs 40 · 9 (7³ + 40³) / (6 · 12/world · 7 · 40) = 2298 (2 ranks) or 3447 (3) steps
    of its layer's work at the budget of 1/40, a block refreshed sparsely at that period (a
    multiple of the factor period, 10); the others keep the period budgeted over every block,
    the longest (40 · 9 Σ n³ / (6 · 12/world · Σ a·g) = 1725 or 2588 steps: 50)."""
    for records in runs[0][world][name]:
        assert records[-1]["refreshes"] == (50, {"4": period})


@pytest.mark.parametrize("world", RUNS)
def test_broadcast_mode_sends_only_the_refreshed_eigenpairs(runs, world):
    """Mode "a" (owners broadcast every eigenpair they compute): over the 6 steps of
    "auto-sparse-a" the factors are refreshed at steps 0, 1, 2 and 4 (the doubling warm-up), the
    last Linear's (A 7, G 40, its own sparse schedule) only at 0 and 4. A kept eigenpair is not
    sent again: every rank counts each broadcast buffer, float64 eigenvalues and eigenvectors,
    d + d² numbers for a factor d wide."""
    sizes = [5, 10, 7, 9, 6, 40]  # A of each Linear, then G
    pair = {d: d + d * d for d in sizes}
    every = sum(pair.values())
    sparse_block = pair[7] + pair[40]
    want = 8 * (4 * every - 2 * sparse_block)
    for records in runs[0][world]["auto-sparse-a"]:
        assert records[-1]["comm_bytes"]["inverses"] == want


@pytest.mark.parametrize("world", RUNS)
def test_unequal_batches_average_each_ranks_own_statistics(runs, world):
    """Unequal per-rank batches (2 ranks: 4 + 8 rows; 3 ranks: 2 + 3 + 7): the factors after each
    step are the mean over the ranks of each rank's own statistics (A over its rows, G weighted
    by 1/M of its own mean loss), as the module docstring of kfac_ext.topology says, from
    single processes on each rank's rows. The whole batch's statistics (one process on all 12
    rows) are other matrices: every factor differs from them by over 1e-3 (measured: 3.5e-3 for
    the last layer's G, 4e-2 and more for the rest), ten orders of magnitude above the tolerance.

    Tolerance: as in test_mc_factors_average_each_ranks_own_samples (float64 sums of at most 8
    rows, averaged over 3 ranks, an EMA over 3 steps, in another order): 1e-13."""
    name = "unequal"
    per_rank = runs[0][world][name]
    assert_ranks_identical(per_rank, name)
    records = per_rank[0]
    bounds = SCENARIOS[name]["split"][world]
    own = _single_process_factors(records, name, [slice(bounds[r], bounds[r + 1]) for r in range(world)], [0] * world)
    whole = _single_process_factors(records, name, [slice(0, B)], [0])
    for step, (record, want, pooled) in enumerate(zip(records, own, whole)):
        assert record["factors"].keys() == want.keys() == {"0", "2", "4"}
        for k, (a, g) in record["factors"].items():
            assert rel(a, want[k][0]) < 1e-13, f"step {step}: A of layer {k}"
            assert rel(g, want[k][1]) < 1e-13, f"step {step}: G of layer {k}"
            assert rel(a, pooled[k][0]) > 1e-3 and rel(g, pooled[k][1]) > 1e-3, \
                f"step {step}: layer {k}'s factors do not tell the ranks' batches from the whole batch"
    assert records[-1]["stats"]["factor_updates"] == SCENARIOS[name]["steps"]


def test_fsdp_bf16_compute_keeps_float32_factors(runs):
    """bf16 forward/backward under FSDP2's MixedPrecisionPolicy: the factors stay float32 and
    finite, every rank agrees, and every parameter trains. The first step's factors (same
    parameters and data as the float64 run) agree with float64's within bf16 rounding: inputs,
    activations and output gradients carry 8-bit mantissas (eps 2⁻⁸ ≈ 4e-3), a few roundings
    deep, so 2e-2. Later steps are not compared: the damped inverses (no KL clip here) amplify
    those differences in the parameters."""
    per_rank = runs[0][2]["fsdp-bf16"]
    assert_ranks_identical(per_rank, "fsdp-bf16")
    want = reference("fsdp-a-eigen-type2")
    records = per_rank[0]
    for rec in records:
        assert all(a.dtype == g.dtype == torch.float32 for a, g in rec["factors"].values())
        assert all(torch.isfinite(t).all() for pair in rec["factors"].values() for t in pair)
    for k, (a, g) in records[0]["factors"].items():
        a64, g64 = want[0]["factors"][k]
        assert rel(a.double(), a64) < 2e-2 and rel(g.double(), g64) < 2e-2, f"first factors of layer {k}"
    for i, (p, p0) in enumerate(zip(records[-1]["params"], mlp().parameters())):
        assert torch.isfinite(p).all() and rel(p, p0.detach()) > 1e-3, f"parameter {i} did not train"


@pytest.mark.parametrize("name", ["nan-input", "fsdp-nan-input"])
def test_nonfinite_input_on_one_rank_skips_everywhere(runs, name):
    for records in runs[0][2][name]:
        stats = records[-1]["stats"]
        assert stats["skipped_factor_updates"] == 1 and stats["nonfinite_grad_steps"] == 1
        for p, q in zip(records[2]["params"], records[1]["params"]):
            assert torch.equal(p, q)  # the step with NaN gradients changed nothing


def test_nonfinite_statistics_on_one_rank_skip_the_factor_update_everywhere(runs):
    for records in runs[0][2]["nan-statistics"]:
        assert [r["stats"]["factor_updates"] for r in records] == [1, 1, 2, 3]
        assert records[-1]["stats"]["skipped_factor_updates"] == 1
        assert records[-1]["stats"]["nonfinite_grad_steps"] == 0
        for k in records[0]["factors"]:  # step 1 left the factors as step 0 made them
            for p, q in zip(records[1]["factors"][k], records[0]["factors"][k]):
                assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["fail-a", "fail-b"])
def test_failed_inversion_on_owner_gives_every_rank_the_same_fallback(runs, name):
    for records in runs[0][2][name]:
        assert records[-1]["stats"]["failed_inversions"] == 1
        assert records[-1]["warnings"] == [
            "KFACPreconditioner: inverting factor G of block '0' failed (FAILED) even in float64; "
            "using the previous inverse (warned once per factor)"]
        assert records[-1]["stats"]["inverse_updates"] == 2


# ---- checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ckpt-a", "ckpt-b", "fsdp-ckpt"])
def test_checkpoint_from_two_ranks_resumes_on_one(runs, name):
    spec = SCENARIOS[name]
    path = runs[1][2] / f"{name}.ckpt"
    state = torch.load(path, weights_only=False)["optimizer"]["kfac"]
    assert set(state["factors"]) == {"0", "2", "4"}  # no "module." prefix
    assert state["generator_rank"] == 0
    if name == "ckpt-b":  # rank 0 holds the inverses of the layers it owns only
        assert set(state["inverses"]) == {"2"}
    resumed = train(spec, resume=str(path))
    continued = runs[0][2][name][0][spec["save_after"]:]
    assert len(resumed) == len(continued) == spec["steps"] - spec["save_after"]
    for step, (got, want) in enumerate(zip(resumed, continued), spec["save_after"]):
        for i, (p, q) in enumerate(zip(got["params"], want["params"])):
            assert rel(p, q) < TOL, f"step {step}: parameter {i}"
        for i, (p, q) in enumerate(zip(got["grads"], want["grads"])):
            assert rel(p, q) < TOL, f"step {step}: gradient {i}"


def test_fsdp_resnet18_captures_every_block(runs):
    """Every block of a sharded torchvision ResNet-18 gets both factors under Monte Carlo
    sampling, finite, the same on both ranks, and every parameter trains (K-FAC's or SGD's)."""
    per_rank = runs[0][2]["fsdp-resnet18"]
    assert_ranks_identical(per_rank, "fsdp-resnet18")
    names = [b.name for b in KFACPreconditioner(resnet18(), loss="cross_entropy", max_factor_dim=600).blocks]
    assert len(names) == 10  # conv1, layer1's 4 convolutions, layer2.0.conv1, the 3 downsamples, fc
    for records in per_rank:
        for rec in records:
            assert sorted(rec["factors"]) == sorted(names)
            assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for pair in rec["factors"].values() for t in pair)
            assert rec["stats"]["nonfinite_grad_steps"] == 0
        assert records[-1]["stats"]["factor_updates"] == 2
        for i, (p, p0) in enumerate(zip(records[-1]["params"], resnet18().parameters())):
            assert torch.isfinite(p).all() and not torch.equal(p, p0.detach()), f"parameter {i} did not train"


@pytest.mark.parametrize("world", RUNS)
def test_unsupported_sharding_is_refused(runs, world):
    for partly, attention in runs[0][world]["refusal"]:
        assert "needs every preconditioned layer sharded; ['2', '4'] are not" in partly
        assert "does not support blocks sharing a parameter ('attn.q' and 'attn.k'" in attention


def test_sharded_checkpoint_resumes_on_another_sharded_world_size(runs):
    """Saved by 2 sharded ranks after 3 steps, resumed by 3 sharded ranks (another
    grad_worker_fraction): the remaining steps equal one process's and each other's."""
    per_rank = runs[0][3]["fsdp-resume"]
    assert_ranks_identical(per_rank, "fsdp-resume")
    want = reference("fsdp-ckpt")[SCENARIOS["fsdp-ckpt"]["save_after"]:]
    for r, records in enumerate(per_rank):
        assert len(records) == len(want) == 3
        for step, (got, ref) in enumerate(zip(records, want)):
            assert_close(got, ref, f"fsdp-resume, rank {r}, step {step + 3}")


# ---- no process group, or one rank: the single-process code path --------------------------


@pytest.mark.parametrize("name", ["a-eigen-type2", "fsdp-inplace-type2", "fsdp-adaptive"])
def test_world_size_one_process_group_is_the_single_process_path(tmp_path, name):
    """A process group of one rank: no distributed context; under FSDP2 (one-rank mesh, DTensor
    parameters) the same results as the unsharded model."""
    spec = SCENARIOS[name]
    want = train(spec)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = mlp()
        assert isinstance(KFACPreconditioner(model, loss="cross_entropy").topology, kd.Local)
        got = train(spec)
    finally:
        dist.destroy_process_group()
    for step, (g, w) in enumerate(zip(got, want)):
        if spec["wrap"] == "fsdp":
            assert_close(g, w, f"{name}, step {step}")
        else:
            assert all(torch.equal(p, q) for p, q in zip(g["params"], w["params"]))


def test_bad_grad_worker_fraction_is_refused():
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        KFACPreconditioner(mlp(), loss="cross_entropy", grad_worker_fraction=1.5)


# ---- assignment and packing (no processes) ----------------------------------------------


def _loads(owner: dict[str, int], costs: dict[str, float], world: int) -> list[float]:
    loads = [0.0] * world
    for k, r in owner.items():
        loads[r] += costs[k]
    return loads


def test_assignment_balances_cost():
    rng = random.Random(0)
    checked = 0
    for _ in range(3000):
        world = rng.randint(1, 8)
        dims = [rng.choice([rng.randint(1, 16), rng.randint(16, 512)]) for _ in range(rng.randint(1, 24))]
        costs = {f"layer{i}.{s}": float(d) ** 3 for i, d in enumerate(dims) for s in "AG"[: rng.randint(1, 2)]}
        owner = kd.lpt_assignment(costs, world)
        assert owner.keys() == costs.keys() and set(owner.values()) <= set(range(world))
        loads = _loads(owner, costs, world)
        avg, largest = sum(costs.values()) / world, max(costs.values())
        # Graham's list-scheduling bound holds always ...
        assert max(loads) <= avg + (1 - 1 / world) * largest + 1e-6 * avg
        # ... and the 1.5 × average bound whenever at most `world` items exceed half the average.
        if sum(c > avg / 2 for c in costs.values()) <= world:
            checked += 1
            assert max(loads) <= max(largest, 1.5 * avg) * (1 + 1e-12)
    assert checked > 1000


def test_assignment_of_real_models_balances_cost():
    for model in (mlp(), nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)]),
                  nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 10))):
        layers = KFACPreconditioner(model, loss="cross_entropy").blocks
        for colocate in (False, True):
            costs = kd.inversion_costs(layers, colocate)
            for world in (2, 3, 4):
                loads = _loads(kd.lpt_assignment(costs, world), costs, world)
                avg = sum(costs.values()) / world
                assert max(loads) <= max(max(costs.values()), 1.5 * avg)


def test_assignment_is_deterministic_and_breaks_ties_by_name():
    costs = {f"l{i}": float(c) for i, c in enumerate([8, 8, 1, 1, 27, 27, 8, 1])}
    want = kd.lpt_assignment(costs, 3)
    for seed in range(5):
        keys = list(costs)
        random.Random(seed).shuffle(keys)
        assert kd.lpt_assignment({k: costs[k] for k in keys}, 3) == want
    assert kd.lpt_assignment({"b": 1.0, "a": 1.0}, 2) == {"a": 0, "b": 1}


def test_lpt_cannot_always_meet_1_5_average():
    """Why the 1.5 × average bound needs its condition: 5 equal items on 4 ranks."""
    costs = {str(i): 1.0 for i in range(5)}
    loads = _loads(kd.lpt_assignment(costs, 4), costs, 4)
    assert max(loads) == 2.0 > 1.5 * 5 / 4


@pytest.mark.parametrize("n", [1, 2, 7])
def test_upper_triangle_roundtrip_is_exactly_symmetric(n):
    m = torch.randn(n, n, dtype=F64)
    m = m + m.T
    flat = kd.pack_upper(m)
    assert flat.numel() == n * (n + 1) // 2
    iu = torch.triu_indices(n, n)
    assert torch.equal(flat, m[iu[0], iu[1]])
    out = kd.unpack_upper_(torch.full((n, n), float("nan"), dtype=F64), flat * 3)
    assert torch.equal(out, out.T) and torch.equal(out, m * 3)
