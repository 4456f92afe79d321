"""Pools consumed in slices (the AOT authors' scheme), with the next pool solved in the background.

The authors (EDM-AOT code, Mar 2024) draw a pool of P augmented images and P noises per GPU, solve the P x P
assignment once, then train on consecutive slices of ``batch`` rows for P / batch steps before drawing the next
pool. OT thus sees P samples while the model batch stays small (P = 512 uncond. / 2048 cond., 64 per GPU).

:class:`PairedBatchStream` does that, plus:

- ``pools=K`` virtual ranks on one device: K independent pools of P, solved separately, each giving batch/K rows to
  every step (the paper's 4 x 512 pools with 64 per GPU = ``pools=4, pool_size=512, batch=256`` on one GPU).
- ``scope='global'`` under DDP: one assignment over the union of every rank's pools (see ``distributed.py``).
- a one-thread worker that solves pool t+1 while pool t is consumed, so a step never waits once a pool lasts
  >= 2 steps. The next pool's random draws happen at a fixed point (right after the current pool is installed)
  in the main thread, so the result is identical with and without the worker.
- exact resume: ``state_dict()`` holds the current (already paired) pool, the cursor, and the source's state
  taken *before* the next pool was drawn; ``load_state_dict()`` restores the pool and redraws the same next pool.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from aotdiff.coupling.couplers import Coupler, CouplingStats, IndependentCoupling
from aotdiff.coupling.distributed import broadcast_from_first, gather_rows, group_rank_and_size

SCOPES = ("rank", "global")
STATE_FORMAT = "aotdiff.coupling.PairedBatchStream/1"


@dataclass
class PoolDraw:
    """n fresh training rows from a source: augmented images [n, ...] and exactly n noises of the same shape."""

    images: torch.Tensor
    noise: torch.Tensor
    labels: torch.Tensor | None = None  # int64 class indices [n] or one-hot [n, K]
    augment_labels: torch.Tensor | None = None  # EDM's 9 augmentation conditioning values [n, 9]


class PoolSource(Protocol):
    """Where pools come from. All its randomness must live in generators captured by ``state_dict``."""

    def draw(self, n: int) -> PoolDraw: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class PoolStats:
    """One pool: its index (0, 1, ...), the coupling stats, how long the consumer waited for it, steps it lasts."""

    index: int
    coupling: CouplingStats
    wait_ms: float
    steps: int


@dataclass
class PairedBatch:
    """One training step's rows: image i is paired with noise i. ``step_in_pool == 0`` marks a fresh pool."""

    images: torch.Tensor
    noise: torch.Tensor
    labels: torch.Tensor | None
    augment_labels: torch.Tensor | None
    stats: PoolStats
    step_in_pool: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_pool_size(pool_size: int, batch: int, pools: int = 1, *, per_device: int | None = None) -> int:
    """Check that pools of ``pool_size`` rows split into whole slices; return the steps each pool lasts.

    Every step takes ``batch / pools`` consecutive rows from each pool, so ``pools`` must divide ``batch`` and
    the slice must divide ``pool_size``. (The authors' code silently trains on empty slices otherwise.) With
    ``per_device`` (the per-device batch, which ``batch`` = --batch-gpu must divide), every --batch-gpu the message
    proposes divides it too, so following that advice cannot lead to the per-device error.
    """

    def fits(b: int) -> bool:
        return per_device is None or per_device % b == 0

    if batch < 1:
        raise ValueError(f"--batch-gpu {batch}: the per-device batch must be at least 1")
    if pools < 1:
        raise ValueError(f"--aot-pools {pools}: the number of pools per device must be at least 1")
    if pool_size < 1:
        raise ValueError(f"--aot-pool {pool_size}: the pool size must be at least 1")
    if batch % pools:
        why = f"--batch-gpu {batch} is not divisible by --aot-pools {pools}: every step takes the same number of rows "
        why += "from each pool."
        limit = per_device if per_device is not None else batch + pools
        multiples = [b for b in range(pools, limit + 1, pools) if fits(b)]
        below, above = [b for b in multiples if b < batch], [b for b in multiples if b > batch]
        options = " or ".join(str(b) for b in [*below[-1:], *above[:1]])
        if options:
            raise ValueError(f"{why} Use --batch-gpu {options}.")
        counts = [k for k in _divisors(per_device or batch) if k <= 2 * pools and k != pools][-3:]  # 1 always fits
        listed = ", ".join(map(str, counts[:-1])) + " or " if len(counts) > 1 else ""
        raise ValueError(
            f"{why} No --batch-gpu can be: the per-device batch {per_device} is not a multiple of {pools}. Use "
            f"--aot-pools {listed}{counts[-1]}, or a --batch with a multiple of {pools} per device."
        )
    part = batch // pools
    if pool_size % part == 0:
        return pool_size // part
    lo, hi = (pool_size // part) * part, (pool_size // part + 1) * part
    pool_options = f"{lo} or {hi}" if lo else f"{hi}"
    # A slice under a quarter of today's would mean many more, smaller steps: not advice worth giving.
    slices = [d for d in _divisors(pool_size) if fits(d * pools) and 4 * d >= part]
    near = [*[d for d in slices if d <= part][-1:], *[d for d in slices if d >= part][:1]]
    part_options = " or ".join(str(d * pools) for d in near)
    if pools == 1:
        what = f"--batch-gpu {batch}"
        fix = f", or a --batch-gpu that divides {pool_size} (e.g. {part_options})"
    else:
        what = f"the per-pool slice {part} (--batch-gpu {batch} / --aot-pools {pools})"
        fix = f", or a --batch-gpu whose slice divides {pool_size} (e.g. --batch-gpu {part_options})"
    if not near:
        fix = ""
    unused = pool_size % part if pool_size > part else pool_size
    raise ValueError(
        f"--aot-pool {pool_size} is not a multiple of {what}: each pool is consumed in slices of {part} rows, "
        f"so {unused} rows of every pool would never be trained on. Use --aot-pool {pool_options}{fix}."
    )


@dataclass
class _Pool:
    images: torch.Tensor
    noise: torch.Tensor  # already paired: row i belongs to image i
    labels: torch.Tensor | None
    augment_labels: torch.Tensor | None
    stats: PoolStats


@dataclass
class _Pending:
    """The next pool: drawn (and for 'global', gathered) in the main thread, solved by ``job``."""

    draw: PoolDraw
    gathered: PoolDraw | None
    result: Future | _Deferred


class _Deferred:
    """Future look-alike for worker=False: runs the job when its result is asked for."""

    def __init__(self, job: Callable[[], Any]) -> None:
        self._job = job

    def result(self) -> Any:
        return self._job()

    def done(self) -> bool:
        return True


def _cat_optional(parts: list[torch.Tensor | None], name: str) -> torch.Tensor | None:
    present = [p is not None for p in parts]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"source.draw: {name} is given for some draws and None for others")
    return torch.cat(parts)  # type: ignore[arg-type]


def _to_cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu().clone()


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


class PairedBatchStream:
    """Infinite stream of paired batches drawn from ``source`` in pools coupled by ``coupler``.

    Args:
        source: :class:`PoolSource` giving augmented images, labels, augment labels and noise.
        coupler: :class:`HungarianCoupling` (AOT) or :class:`IndependentCoupling`.
        batch: rows per step on this device (``--batch-gpu``).
        pool_size: P, rows per pool (``--aot-pool``); must be a multiple of batch / pools. None = one step per
            pool; with IndependentCoupling the pool is always one step (nothing to pair).
        pools: K virtual ranks on this device: K pools of P solved separately, each giving batch/K rows per step.
        scope: 'rank' (each rank, each virtual pool solved alone, like the authors) or 'global' (one assignment
            over the pools of all ranks and all virtual pools; needs every rank to call ``next`` in step).
        worker: solve the next pool in a background thread while the current one is consumed.
        group: process group for scope='global' (None = the default group).
    """

    def __init__(
        self,
        source: PoolSource,
        coupler: Coupler,
        batch: int,
        pool_size: int | None = None,
        *,
        pools: int = 1,
        scope: str = "rank",
        worker: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope: unknown coupling scope {scope!r}; choose 'rank' or 'global'")
        part = batch // pools if pools >= 1 and batch >= 1 else 0
        independent = isinstance(coupler, IndependentCoupling)
        if independent and pool_size not in (None, part):
            raise ValueError(
                f"--aot-pool {pool_size}: independent coupling pairs nothing, so its pool is one step's batch; "
                "drop --aot-pool or use --coupling aot"
            )
        self.pool_size = part if pool_size is None else pool_size
        self.steps_per_pool = validate_pool_size(self.pool_size, batch, pools)
        self.source, self.coupler = source, coupler
        self.batch, self.pools, self.part, self.scope, self.group = batch, pools, part, scope, group
        self._collective = scope == "global" and not independent
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aot-coupling") if worker else None
        self._pool: _Pool | None = None
        self._cursor = 0
        self._pool_index = -1
        self._pending: _Pending | None = None
        self._source_state_before_pending: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------------- consuming
    def __iter__(self) -> PairedBatchStream:
        return self

    def __next__(self) -> PairedBatch:
        return self.next()

    def next(self) -> PairedBatch:
        """The next step's paired rows; installs (and if needed waits for) a new pool when the current is used up."""
        if self._pool is None or self._cursor == self.steps_per_pool:
            self._install_next_pool()
        pool = self._pool
        assert pool is not None
        step = self._cursor
        self._cursor += 1
        return PairedBatch(
            images=self._rows(pool.images, step),
            noise=self._rows(pool.noise, step),
            labels=None if pool.labels is None else self._rows(pool.labels, step),
            augment_labels=None if pool.augment_labels is None else self._rows(pool.augment_labels, step),
            stats=pool.stats,
            step_in_pool=step,
        )

    def _rows(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """Step ``step``'s rows: slice ``step`` of each of the K virtual pools, concatenated in pool order."""
        a, b = step * self.part, (step + 1) * self.part
        if self.pools == 1:
            return t[a:b]
        return torch.cat([t[k * self.pool_size + a : k * self.pool_size + b] for k in range(self.pools)])

    @property
    def stats(self) -> PoolStats | None:
        """Stats of the pool being consumed (None before the first step)."""
        return None if self._pool is None else self._pool.stats

    # ---------------------------------------------------------------------------------------- pool pipeline
    def _draw_local(self) -> PoolDraw:
        """K draws of P rows from the source, concatenated (main thread: the only place randomness is used)."""
        draws = [self.source.draw(self.pool_size) for _ in range(self.pools)]
        for d in draws:
            self._check_draw(d)
        return PoolDraw(
            images=torch.cat([d.images for d in draws]),
            noise=torch.cat([d.noise for d in draws]),
            labels=_cat_optional([d.labels for d in draws], "labels"),
            augment_labels=_cat_optional([d.augment_labels for d in draws], "augment_labels"),
        )

    def _check_draw(self, d: PoolDraw) -> None:
        n = self.pool_size
        if d.images.shape[0] != n:
            raise ValueError(f"source.draw({n}) returned {d.images.shape[0]} images; it must return exactly {n}")
        if d.noise.shape != d.images.shape:
            raise ValueError(
                f"source.draw({n}): noise shape {tuple(d.noise.shape)} differs from images "
                f"{tuple(d.images.shape)}; draw exactly one noise per image"
            )
        for name, t in (("labels", d.labels), ("augment_labels", d.augment_labels)):
            if t is not None and t.shape[0] != n:
                raise ValueError(f"source.draw({n}) returned {t.shape[0]} {name} rows for {n} images")

    def _blocks(self) -> np.ndarray | None:
        """Virtual-pool index per local row: rows are paired only inside their own pool ('rank' scope)."""
        if self.pools == 1:
            return None
        return np.repeat(np.arange(self.pools), self.pool_size)

    def _start_next_pool(self) -> None:
        """Draw the next pool now (fixed point: right after an install) and hand its solve to the worker."""
        self._source_state_before_pending = copy.deepcopy(self.source.state_dict())
        draw = self._draw_local()
        gathered = None
        if self._collective:
            gathered = PoolDraw(
                images=gather_rows(draw.images, self.group),
                noise=gather_rows(draw.noise, self.group),
                labels=None if draw.labels is None else gather_rows(draw.labels, self.group),
            )
        job = self._make_job(draw, gathered)
        result = self._executor.submit(job) if self._executor is not None else _Deferred(job)
        self._pending = _Pending(draw, gathered, result)

    def _make_job(self, draw: PoolDraw, gathered: PoolDraw | None) -> Callable[[], Any]:
        coupler, blocks = self.coupler, self._blocks()
        if gathered is None:
            return lambda: coupler.assign(draw.images, draw.noise, draw.labels, blocks)
        rank, _ = group_rank_and_size(self.group)
        if rank != 0:
            return lambda: None  # the first rank solves; the others receive its permutation
        return lambda: coupler.assign(gathered.images, gathered.noise, gathered.labels, None)

    def _install_next_pool(self) -> None:
        if self._pending is None:
            self._start_next_pool()
        pending = self._pending
        assert pending is not None
        t0 = time.perf_counter()
        result = pending.result.result()
        if pending.gathered is None:
            perm, coupling = result
            noise = pending.draw.noise[torch.as_tensor(perm, device=pending.draw.noise.device)]
        else:
            noise, coupling = self._receive_global(pending, result)
        wait_ms = 1e3 * (time.perf_counter() - t0)
        self._pool_index += 1
        stats = PoolStats(self._pool_index, coupling, wait_ms, self.steps_per_pool)
        d = pending.draw
        self._pool = _Pool(d.images, noise, d.labels, d.augment_labels, stats)
        self._cursor = 0
        self._start_next_pool()

    def _receive_global(self, pending: _Pending, result: Any) -> tuple[torch.Tensor, CouplingStats]:
        """Broadcast the first rank's permutation and stats; keep the noise of this rank's own rows."""
        gathered = pending.gathered
        assert gathered is not None
        device = gathered.noise.device
        rank, _ = group_rank_and_size(self.group)
        n_all, n_mine = gathered.noise.shape[0], pending.draw.noise.shape[0]
        if result is not None:
            perm_t = torch.as_tensor(result[0], dtype=torch.long).to(device)
            stats_t = result[1].as_tensor().to(device)
        else:
            perm_t = torch.empty(n_all, dtype=torch.long, device=device)
            stats_t = torch.empty(6, dtype=torch.float64, device=device)
        perm_t = broadcast_from_first(perm_t, self.group)
        stats_t = broadcast_from_first(stats_t, self.group)
        mine = perm_t[rank * n_mine : (rank + 1) * n_mine]
        return gathered.noise[mine].to(pending.draw.noise.device), CouplingStats.from_tensor(stats_t)

    # ------------------------------------------------------------------------------------------------ resume
    def _config(self) -> dict[str, Any]:
        _, world = group_rank_and_size(self.group) if self._collective else (0, 1)
        return {
            "pool_size": self.pool_size,
            "batch": self.batch,
            "pools": self.pools,
            "scope": self.scope,
            "world": world,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers only (loadable with ``torch.load(weights_only=True)``)."""
        pool = None
        if self._pool is not None:
            p = self._pool
            pool = {
                "images": _to_cpu(p.images),
                "noise": _to_cpu(p.noise),
                "labels": _to_cpu(p.labels),
                "augment_labels": _to_cpu(p.augment_labels),
                "stats": {**asdict(p.stats), "coupling": asdict(p.stats.coupling)},
            }
        source = self._source_state_before_pending if self._pending is not None else self.source.state_dict()
        return {
            "format": STATE_FORMAT,
            "config": self._config(),
            "pool_index": self._pool_index,
            "cursor": self._cursor,
            "pool": pool,
            "source": copy.deepcopy(source),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken: same pool, same cursor, same next pool."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"state: not a PairedBatchStream state (format {state.get('format')!r})")
        saved, now = state["config"], self._config()
        for key in now:
            if saved.get(key) != now[key]:
                raise ValueError(
                    f"state: the pool stream was saved with {key}={saved.get(key)!r} but is now {now[key]!r}; "
                    "resume with the same --batch-gpu, --aot-pool, --aot-pools, scope and GPU count"
                )
        self._drop_pending()
        self.source.load_state_dict(copy.deepcopy(state["source"]))
        self._pool_index, self._cursor = int(state["pool_index"]), int(state["cursor"])
        self._pool = None
        if state["pool"] is None:
            return
        self._start_next_pool()
        assert self._pending is not None
        device = self._pending.draw.images.device
        p = state["pool"]
        stats = PoolStats(**{**p["stats"], "coupling": CouplingStats(**p["stats"]["coupling"])})
        self._pool = _Pool(
            p["images"].to(device),
            p["noise"].to(device),
            _to(p["labels"], device),
            _to(p["augment_labels"], device),
            stats,
        )

    def _drop_pending(self) -> None:
        """Forget the drawn-but-unused next pool (waiting for its solve so two never run at once)."""
        if self._pending is not None and isinstance(self._pending.result, Future):
            future = self._pending.result
            if not future.cancel():
                future.exception()  # blocks until the running solve ends; its outcome is not needed
        self._pending = None
        self._source_state_before_pending = None

    # -------------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the worker thread (waits for a solve in progress)."""
        self._drop_pending()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> PairedBatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorSource:
    """A :class:`PoolSource` over in-memory tensors (toys, tests, benchmarks): floating-point rows in the model's
    space (images in [-1, 1], like the noise they are paired with; uint8 pixels are refused), labels optional.

    Rows are drawn without replacement in seeded shuffled epochs (like EDM's InfiniteSampler) and noise comes from
    a second generator, so a pool is a pure function of (seed, position). No augmentation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels: {labels.shape[0]} rows for {images.shape[0]} images")
        if not torch.is_tensor(images) or not images.dtype.is_floating_point:
            got = images.dtype if torch.is_tensor(images) else type(images).__name__
            raise ValueError(
                f"images: expected a floating-point torch tensor in the model's space (e.g. uint8 pixels as "
                f"x / 127.5 - 1), got {got}; OT would otherwise pair 0..255 pixels with N(0, 1) noise"
            )
        self.images, self.labels = images, labels
        self.device = torch.device(device) if device is not None else images.device
        self._order_gen = torch.Generator().manual_seed(2 * seed)
        self._noise_gen = torch.Generator().manual_seed(2 * seed + 1)
        self._order = torch.randperm(images.shape[0], generator=self._order_gen)
        self._pos = 0

    def _indices(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self._pos == self._order.numel():
                self._order = torch.randperm(self.images.shape[0], generator=self._order_gen)
                self._pos = 0
            take = min(n, self._order.numel() - self._pos)
            out.append(self._order[self._pos : self._pos + take])
            self._pos += take
            n -= take
        return torch.cat(out)

    def draw(self, n: int) -> PoolDraw:
        idx = self._indices(n)
        images = self.images[idx].to(self.device)
        dtype = images.dtype if images.is_floating_point() else torch.float32
        noise = torch.randn(images.shape, generator=self._noise_gen, dtype=dtype).to(self.device)
        labels = None if self.labels is None else self.labels[idx].to(self.device)
        return PoolDraw(images=images, noise=noise, labels=labels)

    def state_dict(self) -> dict[str, Any]:
        return {
            "order": self._order.clone(),
            "pos": self._pos,
            "order_gen": self._order_gen.get_state(),
            "noise_gen": self._noise_gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order, self._pos = state["order"].clone(), int(state["pos"])
        self._order_gen.set_state(state["order_gen"])
        self._noise_gen.set_state(state["noise_gen"])
