"""Stability of the defaults at AdamW-family learning rates: ``KFAC(model, lr=lr,
loss="cross_entropy")`` against ``torch.optim.AdamW(lr=lr)`` on real third-party models built from
configs (Hugging Face GPT-2, Llama, BERT, T5; torchvision MobileNetV3-small, ResNet-18), one
fixed random batch, the same initial weights for both. Reports, per lr, the largest loss over
the run relative to the first ("max/start": above 1.00 is a spike above the starting loss) and
the last loss. A fixed batch is the harshest case for early, low-rank bases: nothing but the
curvature of one batch.

    python bench/stability.py [--models gpt2,llama,bert,t5,mobilenet,resnet18] [--lrs 1e-4,...]
                              [--steps 30]

ResNet-18's eigendecompositions (A of layer4 is 4609 wide) take ~30 s each on 2 CPU cores:
give it ``--steps 10`` (inversions at steps 0, 1, 2, 4, 8).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import kfac_ext

LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]


class _Logits(nn.Module):
    """A Hugging Face model of token ids (and, for T5, decoder ids) returning its logits."""

    def __init__(self, model: nn.Module, seq2seq: bool = False):
        super().__init__()
        self.model, self.seq2seq = model, seq2seq

    def forward(self, ids):
        if self.seq2seq:
            return self.model(input_ids=ids, decoder_input_ids=ids).logits
        return self.model(input_ids=ids).logits


def make(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, input, target) with a fixed seed; the target matches the logits' leading dims."""
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (8, 16))
    if name in ("mobilenet", "resnet18"):
        import torchvision

        build = torchvision.models.mobilenet_v3_small if name == "mobilenet" else torchvision.models.resnet18
        return build(num_classes=10), torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    import transformers

    small = dict(vocab_size=64)
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16,
                                                                     bos_token_id=0, eos_token_id=0, **small))
    elif name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=16, **small))
    elif name == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, **small))
    elif name == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, decoder_start_token_id=0, **small))
    else:
        raise ValueError(f"unknown model {name!r}")
    return _Logits(model, seq2seq=name == "t5"), ids, torch.randint(0, 64, (8, 16))


def run(name: str, optimizer: str, lr: float, steps: int) -> list[float]:
    model, x, y = make(name)
    opt = (torch.optim.AdamW(model.parameters(), lr=lr) if optimizer == "AdamW"
           else kfac_ext.KFAC(model, lr=lr, loss="cross_entropy"))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,llama,bert,t5,mobilenet")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"{args.steps} steps on one fixed batch; max/start (last loss)\n")
    lrs = [float(v) for v in args.lrs.split(",")]
    print("| model | optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | s |")
    print("|---|---|" + "---:|" * (len(lrs) + 1))
    for name in args.models.split(","):
        for optimizer in ("AdamW", "K-FAC"):
            start, cells = time.perf_counter(), []
            for lr in lrs:
                losses = run(name, optimizer, lr, args.steps)
                worst = max(losses) / losses[0]
                bold = "**" if worst > 1.0 else ""
                cells.append(f"{bold}{worst:.3f}{bold} ({losses[-1]:.3g})")
            print(f"| {name} | {optimizer} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
