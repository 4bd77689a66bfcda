"""Small helpers several parts share: schedules, finiteness on the device, grouping, batching by
bytes, warnings given once, a Kronecker product with a possibly diagonal side, the counters."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

Schedule = float | int | Callable[[int], float]


def value(schedule: Schedule | Any, step: int):
    """A schedule's value at ``step``: the callable's result, or the number itself."""
    return schedule(step) if callable(schedule) else schedule


class Doubling:
    """A period schedule that starts fresh and settles: ``doubling(100)(step)`` is the largest
    power of two <= step below step 100 (1 at steps 0 and 1), and 100 from then on — so with
    ``inv_update_steps=doubling(100)`` the inversions run at steps 0, 1, 2, 4, ..., 64, 100, 200,
    ...: the first bases, made from few statistics, are replaced quickly."""

    def __init__(self, period: int):
        self.period = int(period)

    def __call__(self, step: int) -> int:
        if step >= self.period:
            return self.period
        return 1 << max(0, int(step).bit_length() - 1)

    def __repr__(self) -> str:
        return f"doubling({self.period})"


doubling = Doubling

#: ``inv_update_steps="auto"``: the decompositions take about 1/REFRESH_BUDGET of the layers'
#: flops, refreshed every 10 to 50 steps
REFRESH_BUDGET = 40
SHORTEST_REFRESH, LONGEST_REFRESH = 10, 50


def budgeted_period(decomposition_flops: float, step_flops: float, granularity: int,
                    longest: int | None = LONGEST_REFRESH) -> int:
    """The refresh period, in steps, at which decompositions of ``decomposition_flops`` take
    about 1/:data:`REFRESH_BUDGET` of training steps of ``step_flops`` each: a multiple of
    ``granularity`` (the factor period, so that a refresh finds the factors just updated) within
    :data:`SHORTEST_REFRESH` .. ``longest`` (None: no upper bound)."""
    steps = REFRESH_BUDGET * decomposition_flops / max(step_flops, 1.0)
    period = max(SHORTEST_REFRESH, granularity * max(1, round(steps / granularity)))
    return period if longest is None else min(longest, period)


def sparse_refresh_due(step: int, period: int) -> bool:
    """The refresh steps of a block whose decompositions cost more than its layer's work over
    :data:`REFRESH_BUDGET` steps: 0, 4, 16, 64, ... (its basis ages fourfold between refreshes,
    not twofold) below ``period``, and every ``period`` steps from then on."""
    if step >= period:
        return step % period == 0
    return step == 0 or (step >= 4 and step & (step - 1) == 0 and (step.bit_length() - 1) % 2 == 0)


#: elements from which a tensor's finiteness is checked by its own min / max pass
OWN_PASS_ELEMENTS = 1 << 14


def all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool on the device: every element of every tensor is finite. Exact (a NaN or an
    inf, and nothing else, makes a min or a max, or a norm accumulated where no square
    overflows, non-finite), one pass per tensor, no host read. Large tensors take
    ``aminmax``: no arithmetic to overflow and nothing allocated — a float64 norm of a float32
    tensor would copy it to float64 first (8 MiB for a 1025² factor, at a backward's memory
    peak) and costs ~4x as long. Small tensors take one ``_foreach_norm`` call for all (on a
    small model the per-op cost, not the arithmetic, is what a step pays): the 2-norm in float64
    (no float32 / bfloat16 / float16 square overflows), the max-norm for float64 tensors."""
    nonempty = [t for t in tensors if t.numel()]
    if not nonempty:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device)
    large = [t for t in nonempty if t.numel() >= OWN_PASS_ELEMENTS]
    narrow = [t for t in nonempty if t.numel() < OWN_PASS_ELEMENTS and t.dtype != torch.float64]
    wide = [t for t in nonempty if t.numel() < OWN_PASS_ELEMENTS and t.dtype == torch.float64]
    finite = [torch.stack(torch.aminmax(t)).isfinite() for t in large]
    norms = list(torch._foreach_norm(narrow, 2, dtype=torch.float64)) if narrow else []
    norms += torch._foreach_norm(wide, ord=float("inf")) if wide else []
    if norms:
        finite.append(torch.stack(norms).isfinite())
    return torch.cat(finite).all()


def group_by(items: Iterable[T], key: Callable[[T], Hashable]) -> dict[Hashable, list[T]]:
    """``items`` by ``key``, each group in the items' order, the groups in order of first
    appearance."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def batched_by_bytes(items: Iterable[T], nbytes: Callable[[T], int], cap: int) -> list[list[T]]:
    """``items`` in consecutive batches of at most ``cap`` bytes each (an item larger than
    ``cap`` gets a batch of its own), so that no single call or buffer holds everything."""
    batches, batch, size = [], [], 0
    for item in items:
        n = nbytes(item)
        if batch and size + n > cap:
            batches.append(batch)
            batch, size = [], 0
        batch.append(item)
        size += n
    return batches + ([batch] if batch else [])


def warn_once(seen: set[str], key: str, message: str) -> None:
    """``RuntimeWarning(message)`` the first time ``key`` is seen (``seen`` is saved in
    checkpoints, so a resumed run does not warn again), attributed to the user's line: the first
    caller outside kfac_ext and torch (``KFAC.step`` comes through torch.optim's wrappers, a hook
    through ``nn.Module.__call__``)."""
    if key in seen:
        return
    seen.add(key)
    warn(message)


def warn(message: str) -> None:
    """``RuntimeWarning(message)`` attributed to the user's line (see :func:`warn_once`)."""
    warnings.warn(message, RuntimeWarning, stacklevel=_user_stacklevel())


_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                  os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, for the call in :func:`warn`, of the first frame outside
    kfac_ext and torch (1 would be :func:`warn` itself)."""
    frame, level = sys._getframe(2), 2  # warn's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def kron_times(left: Tensor, matrix: Tensor, right: Tensor, ops) -> Tensor:
    """``L M Rᵀ`` for symmetric ``L`` and ``R`` (the Kronecker product ``L ⊗ R`` times
    ``vec(M)``); ``R`` a vector is a diagonal matrix (an embedding's A): it scales columns."""
    if right.dim() == 1:
        return (left @ matrix) * right
    return ops.kron_matmul([left], [matrix], [right])[0]


class Counters(dict):
    """The preconditioner's counters (``stats``). Steps keep the non-finite step count and the
    KL-clip scale on the device, so that they need not synchronize; :meth:`synced` brings them
    to the host."""

    def reset(self, counters: dict) -> None:
        self.clear()  # in place: the parts count into this dict
        self.update(counters)
        self._nonfinite: Tensor | None = None  # non-finite steps not yet added
        self._kl_scale: Tensor | None = None  # the last step's clip scale, not yet read

    def count_nonfinite(self, skipped: Tensor) -> None:
        """Adds ``skipped`` (a 0-d bool on the device) to the non-finite step count, on the device."""
        skipped = skipped.to(torch.int64)
        self._nonfinite = skipped if self._nonfinite is None else self._nonfinite + skipped

    def set_kl_scale(self, scale: Tensor | None) -> None:
        """The last step's clip scale, on the device; None when clipping is off (scale 1)."""
        self._kl_scale = scale
        if scale is None:
            self["kl_clip_scale"] = 1.0

    def synced(self) -> Counters:
        if self._nonfinite is not None:
            self["nonfinite_grad_steps"] += int(self._nonfinite)
            self._nonfinite = None
        if self._kl_scale is not None:
            self["kl_clip_scale"] = float(self._kl_scale)
            self._kl_scale = None
        return self


@contextlib.contextmanager
def flush_denormals():
    """Subnormal floats are flushed to zero by this thread's CPU arithmetic while the block runs,
    and the previous setting comes back after. The eigendecomposition of a low-rank factor makes
    subnormals, and x86 arithmetic on them is up to ~100x slower: torchvision ResNet-18 on a
    batch of 8 (layer4's A is 4609 wide with rank <= 8) took 69-82 s per inversion step instead
    of 28-34 s. K-FAC uses nothing below float32's 1.2e-38."""
    was_on = _flushing_denormals()
    if not was_on:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was_on:
            torch.set_flush_denormal(False)


def _flushing_denormals() -> bool:
    """Whether this thread already flushes subnormals (torch has no getter): a float32 subnormal
    times one is zero then. Without numpy, assume not."""
    try:
        import numpy as np
    except ImportError:
        return False
    return bool(np.float32(1e-39) * np.float32(1.0) == 0)
