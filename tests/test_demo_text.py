"""The transformer text demo (bench/demo_text.py) runs end to end: a quick run trains both
optimizers, K-FAC on MultiheadAttention, embeddings and [B, T, V] logits, and writes its outputs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_quick_text_demo_trains_both_optimizers(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")  # bench/demo.py, whose helpers the demo shares, needs it
    demo_text = pytest.importorskip("demo_text")
    results = demo_text.main(["--quick", "--out", str(tmp_path)])
    assert set(results) == {"K-FAC", "AdamW"}
    for name, run in results.items():
        assert "error" not in run, run.get("error")
        assert math.isfinite(run["val_loss"]) and run["val_loss"] < run["history"][0][2], name
    report = results["K-FAC"]["kfac"]["layers"]
    assert "self_attn.q: MultiheadAttention" in report and "tok: Embedding" in report
    assert (tmp_path / "demo_text.json").exists() and (tmp_path / "demo_text.png").exists()
