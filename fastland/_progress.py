"""Optional tqdm progress bars (tqdm is an optional dependency: ``fastland[progress]``)."""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["progress_bar"]


class _NoBar:
    """Stands in for a tqdm bar when progress is off or tqdm is not installed."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it") -> Any:
    """A tqdm bar over ``total`` units, or a no-op bar when ``enabled`` is False or tqdm is absent."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dev dependency
        return _NoBar()
    bar: Optional[Any] = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return bar
