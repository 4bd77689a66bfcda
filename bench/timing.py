"""What every benchmark script shares: the timer and the description of where it ran."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch
import torch.utils.benchmark as tbench

import kfac_ext


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median time of ``fn()`` after one warm-up call (allocator, handles, lazy init);
    ``torch.utils.benchmark`` synchronises CUDA around the measurement."""
    fn()
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def environment(device: torch.device) -> dict:
    env = dict(
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
        kfac_ext=kfac_ext.build_info(),
        device=str(device),
        cpu=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
