"""Benchmarks: Triton kernels run only under the interpreter here (never timed)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastland.testing import num_threads  # noqa: E402


@pytest.fixture(autouse=True)
def _record_versions(request):
    """Record torch's version and thread count in every benchmark's extra_info."""
    yield
    bm = request.node.funcargs.get("benchmark") if hasattr(request.node, "funcargs") else None
    if bm is not None and hasattr(bm, "extra_info"):
        bm.extra_info.setdefault("torch", torch.__version__)
        bm.extra_info.setdefault("threads", torch.get_num_threads())


@pytest.fixture
def one_thread(benchmark):
    """Time on one intra-op thread, restored afterwards: on a shared CPU with few cores a
    2-thread OpenMP region stalls whenever the other core is busy, which turned
    timings bimodal (see the notes). Recorded in extra_info["threads"].
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    benchmark.extra_info["threads"] = 1
    with num_threads(1):
        yield
