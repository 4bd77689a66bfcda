"""Golden values: results recorded from an earlier version of the code, compared with today's.

``KFAC_GOLDEN=record pytest tests/test_bit_identity.py …`` writes them (under
``tests/fixtures/``); a normal run compares. The comparison is ``torch.equal`` when
``KFAC_GOLDEN=strict`` (what a behaviour-preserving refactor must meet, on the machine that
recorded the values), else within a relative tolerance of 1e-12 for results computed in float64
(1e-5 where float32 tensors took part, 1e-4 with bf16 forwards): another CPU model or thread
count may pick other BLAS kernels, which round differently, but no change of the algorithm hides
under 1e-12. (The models' initial weights come from torch's vectorized ``normal_``: AVX2 and
AVX-512 CPUs draw the same values, a CPU without AVX2 — ``ATEN_CPU_CAPABILITY=default`` — others.)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODE = os.environ.get("KFAC_GOLDEN", "")
RELATIVE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-4}
LARGE = 4096  # a tensor with more elements is kept as a sample of 512 elements and its norm


class Golden:
    """One fixture file: ``{key: value}`` where a value is a tensor, a list / dict of them, or a
    number. In record mode :meth:`check` stores, and :meth:`save` (call it once at the end)
    writes the file."""

    def __init__(self, name: str):
        self.path = FIXTURES / f"{name}.pt"
        self.recording = MODE == "record"
        self.values: dict = {} if self.recording else torch.load(self.path, weights_only=False)

    def check(self, key: str, value, computed_in: torch.dtype | None = None) -> None:
        """``computed_in``: the least precise dtype the computation went through, if lower than
        any in ``value`` (bf16 forwards of a float32 or float64 model)."""
        if self.recording:
            self.values[key] = _detached(value)
            return
        assert key in self.values, f"{self.path.name} has no golden value for {key!r}: record it (KFAC_GOLDEN=record)"
        want = self.values[key]
        dtypes = _float_dtypes(want) | ({computed_in} if computed_in is not None else set())
        _compare(value, want, key, max((RELATIVE[d] for d in dtypes), default=RELATIVE[torch.float64]))

    def save(self) -> None:
        if self.recording:
            FIXTURES.mkdir(exist_ok=True)
            torch.save(self.values, self.path)


def _detached(value):
    if isinstance(value, torch.Tensor):
        return _summary(value) if value.numel() > LARGE else value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def _summary(t: torch.Tensor) -> dict:
    """A large tensor as its shape, a strided sample of its elements and its norm (a fixture of
    whole ResNet or GPT-2 parameters would take tens of megabytes)."""
    flat = t.detach().cpu().reshape(-1)
    step = -(-flat.numel() // 512)
    return dict(summary_of=list(t.shape), sample=flat[::step].clone(), norm=flat.double().norm().reshape(1))


def _float_dtypes(value) -> set[torch.dtype]:
    if isinstance(value, torch.Tensor):
        return {value.dtype} if value.dtype in RELATIVE else set()
    values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return set().union(*(_float_dtypes(v) for v in values))


def _compare(got, want, where: str, tolerance: float) -> None:
    """``tolerance``: relative, that of the least precise dtype the result was computed through
    (float64 parameters updated with float32 factors are float32-accurate; so are numbers such as
    the KL clip's scale computed from them)."""
    if isinstance(want, dict) and "summary_of" in want:
        assert isinstance(got, torch.Tensor) and list(got.shape) == want["summary_of"], f"{where}: shape"
        summary = _summary(got)
        for key in ("sample", "norm"):
            _compare(summary[key], want[key], f"{where} ({key})", tolerance)
        return
    if isinstance(want, torch.Tensor):
        got = got.detach().cpu()
        assert got.shape == want.shape and got.dtype == want.dtype, f"{where}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
        if MODE == "strict" or not got.is_floating_point():
            assert torch.equal(got, want), f"{where}: differs from the golden value (max |diff| {_max_diff(got, want)})"
        else:
            err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300))
            assert err <= tolerance, f"{where}: relative error {err:.2e} from the golden value"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), f"{where}: keys {sorted(got)} vs {sorted(want)}"
        for k in want:
            _compare(got[k], want[k], f"{where}[{k!r}]", tolerance)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length {len(got)} vs {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{where}[{i}]", tolerance)
    elif isinstance(want, float) and MODE != "strict":
        assert abs(got - want) <= tolerance * max(1.0, abs(want)), f"{where}: {got} vs {want}"
    else:
        assert got == want, f"{where}: {got!r} vs {want!r}"


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    if not got.is_floating_point():
        return float((got != want).sum())
    return float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
