"""Resumable, sharded per-sample runs over a data set.

:func:`run_resumable` applies ``compute(indices, x, y) -> {field: [B, ...]}``
to every sample of a ``Dataset``/``DataLoader``/tensor and returns the full
``{field: [N, ...]}``. Robustness:

* **Resume.** With ``checkpoint=path``, results and a done-mask ``[N]`` are
  written atomically (temp file + ``os.replace``) at most every
  ``save_interval`` seconds and at the end; a later run with the same
  configuration loads them and computes only the samples not yet done. A
  checkpoint of another configuration (settings, sample count, model
  parameters, world size) is refused with an error naming the file.
* **Shards.** When ``torch.distributed`` is initialised, rank ``r`` of ``w``
  takes the contiguous slice ``[r·N/w, (r+1)·N/w)`` and keeps its own
  checkpoint ``path.rank{r}-of-{w}``; the results are then summed across ranks
  (each entry is non-zero on exactly one rank, so the sum is exact), every rank
  returns the full result and rank 0 writes it to ``path``.

Per-sample randomness comes from :func:`sample_generator` ``(seed, index)``,
so a result never depends on how samples were batched, sharded or resumed.

:func:`landscape_dataset` and :func:`flatness_dataset` are the data-set forms of
:func:`fastland.landscape` and :func:`fastland.flatness` built on it.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .._io import atomic_torch_save as atomic_save
from .._progress import progress_bar

__all__ = ["DataLike", "is_data", "iter_batches", "run_resumable", "sample_generator", "FORMAT",
           "landscape_dataset", "flatness_dataset"]

DataLike = Union[Dataset, DataLoader]
FORMAT = "fastland.runner/1"
Compute = Callable[[Tensor, Tensor, Optional[Tensor]], Dict[str, Tensor]]


def is_data(x: object) -> bool:
    """True for a ``Dataset`` or ``DataLoader`` (the data-set code path)."""
    return isinstance(x, (Dataset, DataLoader))


def sample_generator(seed: int, index: int, device: Union[str, torch.device]) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, index)`` alone."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 2**32 + int(index)) % 2**63)
    return g


# --------------------------------------------------------------------------- data access


def _dataset_and_workers(data: Union[Tensor, DataLike]) -> Tuple[Dataset, int, Any]:
    """``(dataset, num_workers, collate_fn)`` behind a tensor, Dataset or DataLoader."""
    if isinstance(data, Tensor):
        return TensorDataset(data), 0, None
    if isinstance(data, DataLoader):
        return data.dataset, data.num_workers, data.collate_fn
    if isinstance(data, Dataset):
        return data, 0, None
    raise TypeError(f"data: expected a Tensor, Dataset or DataLoader, got {type(data).__name__}")


def _split_item(batch: Any) -> Tuple[Tensor, Optional[Tensor]]:
    """``x`` and ``y`` (or None) from a collated batch: a tensor or a sequence ``(x, y, ...)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise TypeError(f"data: expected items that are tensors or (x, y, ...) tuples, got {type(batch).__name__}")


def _length(dataset: Dataset, limit: Optional[int]) -> int:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError("data: expected a map-style Dataset with a length (not an IterableDataset)") from exc
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: expected a positive int or None, got {limit!r}")
        n = min(n, limit)
    return n


def _load_indices(data: Union[Tensor, DataLike], indices: Sequence[int], batch: int
                  ) -> Iterator[Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """Yield ``(indices [B], x [B, *S], y [B] or None)`` for the given sample indices, in order."""
    dataset, workers, collate = _dataset_and_workers(data)
    kwargs: Dict[str, Any] = {"batch_size": batch, "shuffle": False, "num_workers": workers}
    if collate is not None:
        kwargs["collate_fn"] = collate
    loader = DataLoader(Subset(dataset, list(indices)), **kwargs)
    pos = 0
    for item in loader:
        x, y = _split_item(item)
        idx = torch.as_tensor(list(indices[pos : pos + x.shape[0]]), dtype=torch.long)
        pos += x.shape[0]
        yield idx, x, y


def iter_batches(data: Union[Tensor, DataLike], batch: int, *, limit: Optional[int] = None,
                 progress: bool = False, desc: str = "") -> Iterator[Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """All samples (the first ``limit``) in order: ``(indices [B], x [B, *S], y or None)``."""
    dataset, _, _ = _dataset_and_workers(data)
    n = _length(dataset, limit)
    bar = progress_bar(n, desc, progress, unit="sample")
    for idx, x, y in _load_indices(data, range(n), batch):
        yield idx, x, y
        bar.update(x.shape[0])
    bar.close()


# --------------------------------------------------------------------------- checkpoints


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameter and buffer names, shapes and sums (float64)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            if t.is_floating_point():
                h.update(f"{float(t.double().sum()):.10e}|{float(t.double().abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def _empty_state(n: int, fields: Dict[str, Tuple[int, ...]], dtype: torch.dtype,
                 config: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "config": config,
        "done": torch.zeros(n, dtype=torch.bool),
        "fields": {k: torch.zeros((n, *shape), dtype=dtype) for k, shape in fields.items()},
    }


def _load_state(path: Path, config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``path`` (None when absent); an error when it belongs to another run."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a fastland run file (format {FORMAT})")
    if state.get("config") != config:
        diff = {k: (state.get("config", {}).get(k), v) for k, v in config.items()
                if state.get("config", {}).get(k) != v}
        raise ValueError(
            f"checkpoint: {path} was written by a run with other settings "
            f"(saved vs now: {diff}); delete it or choose another path"
        )
    return state


def _dist_info() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _part_path(path: Path, rank: int, world: int) -> Path:
    return path if world == 1 else path.with_name(f"{path.name}.rank{rank}-of-{world}")


def _gather(state: Dict[str, Any], device: torch.device) -> None:
    """Sum ``state``'s fields and done-mask over ranks in place (disjoint entries: exact)."""
    comm_dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    for k, t in list(state["fields"].items()):
        buf = t.to(comm_dev)
        dist.all_reduce(buf)
        state["fields"][k] = buf.cpu()
    done = state["done"].to(comm_dev, torch.int32)
    dist.all_reduce(done)
    state["done"] = done.cpu() > 0


# --------------------------------------------------------------------------- the runner


def run_resumable(
    data: Union[Tensor, DataLike],
    compute: Compute,
    fields: Dict[str, Tuple[int, ...]],
    config: Dict[str, Any],
    *,
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: Optional[Union[str, Path]] = None,
    limit: Optional[int] = None,
    chunk: int = 64,
    progress: bool = True,
    desc: str = "",
    save_interval: float = 30.0,
    need_labels: bool = False,
) -> Dict[str, Tensor]:
    """Run ``compute`` over every sample, resumably and sharded (see the module doc).

    Args:
        data: tensor ``[N, *S]``, Dataset or DataLoader of ``x`` or ``(x, y, ...)``.
        compute: ``(indices [B], x [B, *S] on device, y [B] or None) -> {field: [B, *shape]}``.
        fields: ``{field: per-sample shape}``.
        config: the run's settings (saved; a checkpoint must match them).
        model: fingerprinted into the configuration.
        device, dtype: where and in what dtype ``x`` is passed to ``compute``.
        checkpoint: result file, or None (nothing saved).
        limit: the first ``limit`` samples only.
        chunk: samples per ``compute`` call (>= 1).
        save_interval: seconds between checkpoint writes (0: after every chunk).
        need_labels: raise when the data has no labels.
    Returns:
        ``{field: [N, *shape]}`` on the CPU, plus ``"done"`` (all True).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_samples: expected a positive int, got {chunk!r}")
    if not isinstance(save_interval, (int, float)) or save_interval < 0:
        raise ValueError(f"save_interval: expected seconds >= 0, got {save_interval!r}")
    dataset, _, _ = _dataset_and_workers(data)
    n = _length(dataset, limit)
    if n == 0:
        raise ValueError("data: expected at least one sample, got none")
    rank, world = _dist_info()
    config = dict(config, n_samples=n, model=model_fingerprint(model), dtype=str(dtype))
    path = Path(checkpoint) if checkpoint is not None else None

    if path is not None:
        final = _load_state(path, dict(config, world=1)) if world > 1 and path.exists() else None
        if final is not None and bool(final["done"].all()):
            return dict(final["fields"], done=final["done"])
    part_config = dict(config, world=world)
    part = _part_path(path, rank, world) if path is not None else None
    state = (_load_state(part, part_config) if part is not None else None) or _empty_state(
        n, fields, dtype, part_config)

    lo, hi = rank * n // world, (rank + 1) * n // world
    pending = [i for i in range(lo, hi) if not bool(state["done"][i])]
    bar = progress_bar(len(pending), desc + (f" [rank {rank}/{world}]" if world > 1 else ""),
                       progress, unit="sample")
    last_save = time.monotonic()
    for idx, x, y in _load_indices(data, pending, chunk):
        if need_labels and y is None:
            raise ValueError("data: FGSM directions need labels; expected (x, y) items")
        out = compute(idx, x.to(device, dtype), None if y is None else y.to(device))
        for k, v in out.items():
            state["fields"][k][idx] = v.detach().to("cpu", dtype)
        state["done"][idx] = True
        bar.update(len(idx))
        if part is not None and time.monotonic() - last_save >= save_interval:
            atomic_save(state, part)
            last_save = time.monotonic()
    bar.close()
    if part is not None:
        atomic_save(state, part)

    if world > 1:
        _gather(state, device)
        state["config"] = dict(config, world=1)
        if rank == 0 and path is not None:
            atomic_save(state, path)
        dist.barrier()
    return dict(state["fields"], done=state["done"])


# --------------------------------------------------------------------------- landscapes and flatness of a data set


def _model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return device, dtype


def _per_sample_pairs(
    model: nn.Module, x: Tensor, y: Optional[Tensor], idx: Tensor, kind: str, n: int, seed: int
) -> Tuple[Tensor, Tensor]:
    """Direction pairs ``[n, B, *S]`` with sample ``idx[k]``'s drawn from generator ``(seed, idx[k])``."""
    from ..neighbourhood import draw_pairs, fgsm_direction, fgsm_pairs

    fgsm = fgsm_direction(model, x, y) if kind == "fgsm" and y is not None else None
    pairs = []
    for k, i in enumerate(idx.tolist()):
        gen = sample_generator(seed, int(i), x.device)
        if fgsm is not None:
            pairs.append(fgsm_pairs(fgsm[k : k + 1], n, gen))
        else:
            pairs.append(draw_pairs(model, x[k : k + 1], None, kind, n, gen))
    return torch.cat([p[0] for p in pairs], dim=1), torch.cat([p[1] for p in pairs], dim=1)


def _check_kind(directions: object) -> str:
    from ..neighbourhood import DIRECTION_KINDS

    if not isinstance(directions, str) or directions not in DIRECTION_KINDS:
        raise ValueError(f"directions: data-set runs draw their own; expected one of {DIRECTION_KINDS}, "
                         f"got {directions!r}" if isinstance(directions, str) else
                         f"directions: data-set runs draw their own; expected one of {DIRECTION_KINDS}, "
                         f"got a {type(directions).__name__}")
    return directions


def landscape_dataset(
    model: nn.Module, data: Union[Tensor, DataLike], *, directions: str = "rademacher",
    span: float = 16 / 255, points: int = 41, batch_size: Union[int, str] = "auto",
    fuse_first_layer: Union[bool, str] = "auto", progress: bool = False,
    checkpoint: Optional[Union[str, Path]] = None, seed: int = 0, limit: Optional[int] = None,
    chunk_samples: int = 64, save_interval: float = 30.0,
) -> Any:
    """:func:`fastland.landscape` over a data set: checkpointed, resumable and sharded.

    The directions of sample ``i`` come from :func:`sample_generator` ``(seed, i)``.
    Returns a :class:`fastland.Landscape` with ``values [N, points, points]`` and
    ``d1 = d2 = None``.
    """
    from .._checks import check_images
    from .._grid import eval_mode, plan
    from ..neighbourhood import check_span_points, grid_coordinates
    from ..landscapes import Landscape, landscape_values

    kind = _check_kind(directions)
    check_span_points(span, points)
    device, dtype = _model_device_dtype(model)
    grid = grid_coordinates(span, points, dtype=dtype, device=device)

    def compute(idx: Tensor, x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        check_images("x", x)
        d1, d2 = _per_sample_pairs(model, x, y, idx, kind, 1, seed)
        p = plan(model, x, batch_size=batch_size, fuse_first_layer=fuse_first_layer, backward=False)
        res = landscape_values(model, x, d1[0], d2[0], grid, grid, p)
        return {"values": res.values, "base_logp": res.base_lse}

    config = {"task": "landscape", "directions": kind, "span": float(span), "points": points, "seed": seed}
    with eval_mode(model):
        res = run_resumable(
            data, compute, {"values": (points, points), "base_logp": ()}, config, model=model,
            device=device, dtype=dtype, checkpoint=checkpoint, limit=limit, chunk=chunk_samples,
            progress=progress, desc="landscape", save_interval=save_interval, need_labels=kind == "fgsm",
        )
    return Landscape(grid.cpu(), grid.cpu().clone(), res["values"], res["base_logp"], None, None, config)


def flatness_dataset(
    model: nn.Module, data: Union[Tensor, DataLike], *, n_dirs: int = 2, span: float = 8 / 255,
    points: int = 5, reduction: str = "sum", directions: str = "rademacher",
    batch_size: Union[int, str] = "auto", fuse_first_layer: Union[bool, str] = "auto", progress: bool = False,
    checkpoint: Optional[Union[str, Path]] = None, seed: int = 0, limit: Optional[int] = None,
    chunk_samples: int = 64, save_interval: float = 30.0,
) -> Any:
    """:func:`fastland.flatness` over a data set: checkpointed, resumable and sharded.

    Returns a :class:`fastland.Flatness` (``phi [N]``, ``mean``, ``stderr``).
    """
    from .._checks import check_images
    from .._grid import eval_mode, plan
    from ..neighbourhood import grid_coordinates
    from ..measures import Flatness, check_flatness_args, flatness_values

    kind = _check_kind(directions)
    check_flatness_args(n_dirs, span, points, reduction, kind)
    device, dtype = _model_device_dtype(model)
    grid = grid_coordinates(span, points, dtype=dtype, device=device)

    def compute(idx: Tensor, x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        check_images("x", x)
        d1, d2 = _per_sample_pairs(model, x, y, idx, kind, n_dirs, seed)
        p = plan(model, x, batch_size=batch_size, fuse_first_layer=fuse_first_layer, backward=True)
        return {"phi": flatness_values(model, x, d1, d2, grid, grid, p, reduction=reduction)}

    config = {"task": "flatness", "directions": kind, "span": float(span), "points": points,
              "n_dirs": n_dirs, "reduction": reduction, "seed": seed}
    with eval_mode(model):
        res = run_resumable(
            data, compute, {"phi": ()}, config, model=model, device=device, dtype=dtype,
            checkpoint=checkpoint, limit=limit, chunk=chunk_samples, progress=progress,
            desc="flatness", save_interval=save_interval, need_labels=kind == "fgsm",
        )
    meta = {k: config[k] for k in ("n_dirs", "span", "points", "reduction", "directions")}
    return Flatness.from_phi(res["phi"], meta)
