"""K-FAC on a Hugging Face model: GPT-2 (built from a config, no download) on byte-level text
this machine already has, with variable-length lines padded (attention_mask 0, labels -100).

    python examples/train_hf_gpt2.py

The one changed line is the optimizer; the loop is the usual Hugging Face one (`model(**batch)
.loss`). K-FAC reads the logits from the ModelOutput and the counted tokens from `labels`
(shifted for a causal LM); GPT-2's tied `lm_head`/`wte` and its LayerNorms go to SGD-momentum.
"""

import pydoc_data.topics

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kfac_ext

torch.manual_seed(0)
lines = [line.encode()[:64] for text in pydoc_data.topics.topics.values() for line in text.splitlines() if len(line) > 20]


def batch_of(rows):
    """Right-padded byte ids, their attention mask, and labels with -100 on the padding."""
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r))
        mask[i, :len(r)] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config)
optimizer = kfac_ext.KFAC(model, lr=1e-3, loss="cross_entropy")  # instead of torch.optim.AdamW(lr=1e-3)
print(optimizer.preconditioner)

for step in range(60):
    rows = [lines[i] for i in torch.randint(0, len(lines), (16,))]
    optimizer.zero_grad()
    loss = model(**batch_of(rows)).loss
    loss.backward()
    optimizer.step()
    if step % 10 == 0 or step == 59:
        print(f"step {step:3d}  loss {loss.item():.3f} nats/byte")
