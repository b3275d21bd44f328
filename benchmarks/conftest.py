"""Benchmarks: Triton kernels run only under the interpreter here (never timed)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _record_versions(request):
    """Record torch's version and thread count in every benchmark's extra_info."""
    yield
    bm = request.node.funcargs.get("benchmark") if hasattr(request.node, "funcargs") else None
    if bm is not None and hasattr(bm, "extra_info"):
        bm.extra_info.setdefault("torch", torch.__version__)
        bm.extra_info.setdefault("threads", torch.get_num_threads())
