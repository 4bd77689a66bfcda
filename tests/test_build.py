"""The built extension itself: it must share torch's C++ runtime."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import kfac_ext._C
from kfac_ext import ops


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils' readelf")
def test_links_the_shared_libstdcxx():
    """A compiler that links libstdc++ statically by default (the GPU machine's /opt/gcc g++ 13)
    put a second copy inside _C: its stream code then crashed (GPU machine) or cut messages off
    at the first number (here) whenever an argument check failed. CMakeLists.txt links the
    libstdc++ torch loaded; the dynamic section must name it."""
    dynamic = subprocess.run(["readelf", "-d", kfac_ext._C.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, dynamic


def test_error_messages_keep_their_numbers():
    """The same failure seen from Python: a message with numbers comes out whole."""
    with pytest.raises(RuntimeError, match=r"^factor_update: factors\[0\] must be 2-D, got shape \[4\]$"):
        ops.factor_update_([torch.randn(4)], [torch.randn(5, 3)], decay=0.9, scales=0.5, append_ones=True)
