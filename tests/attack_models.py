"""Models shared by the tests of the attacks' model paths (the local prefix, the fast forward)."""
from __future__ import annotations

import torch
from torch import nn

from fastland import models


class Opaque(nn.Module):
    """The same function behind a wrapper the attacks' recognisers do not look into."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def seeded_model(name: str, dataset: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``models.create(name, dataset)`` from seed 0, in eval mode and ``dtype``."""
    torch.manual_seed(0)
    return models.create(name, dataset).eval().to(dtype)
