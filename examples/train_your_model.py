"""K-FAC on your own model: the two lines that change in an ordinary training loop.

    python examples/train_your_model.py

Swap in your model, data and loss. K-FAC preconditions Linear, Conv1d/Conv2d, MultiheadAttention,
Embedding and Hugging Face Conv1D layers; every other parameter gets plain SGD-momentum (print
the optimizer's preconditioner to see which). examples/train_hf_gpt2.py does the same for a
Hugging Face model.
"""

import torch
import torch.nn.functional as F
from torch import nn

import kfac_ext

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
)
images, labels = torch.randn(512, 1, 8, 8), torch.randint(0, 10, (512,))  # your data here

# (1) instead of torch.optim.AdamW(model.parameters(), lr=1e-3): Adam in the K-FAC eigenbasis
optimizer = kfac_ext.KFAC(model, lr=1e-3, loss="cross_entropy")
print(optimizer.preconditioner)  # which layers K-FAC preconditions, which it leaves to AdamW
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)

for step in range(100):
    batch = torch.randint(0, len(images), (64,))
    optimizer.zero_grad()
    loss = F.cross_entropy(model(images[batch]), labels[batch])
    loss.backward()
    optimizer.step()  # (2) unchanged call: K-FAC preconditions, then the SGD step
    scheduler.step()
    if step % 20 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")

# Checkpoints hold the factors, inverses, step counters and the sampling RNG:
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, "/tmp/kfac_checkpoint.pt")
print(optimizer.preconditioner.stats)
