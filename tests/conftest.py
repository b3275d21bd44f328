"""Test configuration: the Triton interpreter must be on before triton/torchvision import."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastland.testing import BACKENDS, devices, num_threads  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# (backend, device): every backend on CPU (Triton under the interpreter), Triton and the
# reference on CUDA where present.
KERNEL_CASES = [(b, d) for d in devices() for b in BACKENDS if not (b == "cpp" and d.type != "cpu")]


@pytest.fixture(params=KERNEL_CASES, ids=lambda case: f"{case[0]}-{case[1].type}")
def backend(request) -> str:
    """Each (backend, device) in turn: the backend forced (``fastland.ops.forced_backend``) and
    the device made the default one, so each test's tensors live there; skipped where it cannot run."""
    import torch

    from fastland.ops import backend_refusal, forced_backend

    name, device = request.param
    reason = backend_refusal(name, device)
    if reason is not None:
        pytest.skip(reason)
    with forced_backend(name), torch.device(device):
        yield name


@pytest.fixture
def one_thread():
    """One intra-op thread while a test runs (restored after): on a shared CPU with few cores,
    2-thread OpenMP regions stall behind other processes (10-15x slower).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with num_threads(1):
        yield


@pytest.fixture
def input_grad_calls(monkeypatch):
    """Counts the calls of fast_conv's input-gradient kernel while a test runs: a one-element
    list, ``[calls]``, that the test may reset."""
    from fastland import _conv_grad

    calls = [0]
    kernel = _conv_grad._input_grad_kernel

    def counted(*args):
        calls[0] += 1
        return kernel(*args)

    monkeypatch.setattr(_conv_grad, "_input_grad_kernel", counted)
    return calls
