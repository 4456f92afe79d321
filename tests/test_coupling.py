"""AOT coupling: exact assignment (brute force), class-wise blocks, pools in slices, resume, worker, errors."""

import itertools
import math
import re

import numpy as np
import pytest
import torch

from aotdiff.coupling import (
    BACKENDS,
    CouplingStats,
    HungarianCoupling,
    IndependentCoupling,
    PairedBatchStream,
    PoolDraw,
    TensorSource,
    assignment_cost,
    available_backends,
    backend_available,
    choose_backend,
    cost_matrix,
    solve_assignment,
    solvers,
    validate_pool_size,
)

COSTS = ("l2", "sqeuclidean")


def require_backend(name: str) -> str:
    """``name`` if its solver is installed, else a visible skip naming the package (never a silently dropped test)."""
    if not backend_available(name):
        pytest.skip(f"{name} not installed: pip install {solvers._PIP_PACKAGE[name]}")
    return name


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Every backend aotdiff knows, installed or not: a missing one shows as a skip with its install command."""
    return require_backend(request.param)


def brute_force_min(cost: np.ndarray) -> float:
    """Minimum of sum_i cost[i, p(i)] over all n! permutations p."""
    n = cost.shape[0]
    if n == 0:
        return 0.0
    perms = np.array(list(itertools.permutations(range(n))))
    return float(cost[np.arange(n), perms].sum(axis=1).min())


def assert_row_permutation(out: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """Check that the rows of ``out`` are the rows of ``noise`` as a multiset; return the matching index."""
    same = (out.flatten(1)[:, None, :] == noise.flatten(1)[None, :, :]).all(dim=2)
    # distinct noise rows (continuous draws): every output row equals exactly one input row and vice versa
    assert (same.sum(dim=1) == 1).all() and (same.sum(dim=0) == 1).all()
    return same.int().argmax(dim=1).numpy()


def tied_costs(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "integer":
        return rng.integers(0, 3, size=(n, n)).astype(np.float64)
    if kind == "duplicated_rows":
        base = rng.random((max(1, n // 2), n))
        return base[rng.integers(0, base.shape[0], size=n)]
    if kind == "constant":
        return np.full((n, n), 2.5)
    if kind == "near_ties_float64":  # differences far below float32 resolution at 1e4
        return 1e4 + 1e-3 * rng.random((n, n))
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------- solvers
@pytest.mark.parametrize("n", range(1, 8))
def test_solver_is_optimal_on_random_costs(backend, n):
    rng = np.random.default_rng(n)
    for _ in range(3):
        cost = rng.random((n, n))
        col = solve_assignment(cost, backend)
        assert sorted(col.tolist()) == list(range(n))
        assert assignment_cost(cost, col) == pytest.approx(brute_force_min(cost), abs=1e-12)


@pytest.mark.parametrize("kind", ["integer", "duplicated_rows", "constant", "near_ties_float64"])
def test_solver_is_optimal_on_tied_costs(backend, kind):
    rng = np.random.default_rng(7)
    for n in (2, 5, 7):
        cost = tied_costs(kind, n, rng)
        col = solve_assignment(cost, backend)
        assert sorted(col.tolist()) == list(range(n))
        assert assignment_cost(cost, col) == pytest.approx(brute_force_min(cost), rel=0, abs=1e-9)


@pytest.mark.parametrize("cost_name", COSTS)
@pytest.mark.parametrize("n", [2, 4, 7])
def test_coupler_is_optimal_for_both_costs(backend, cost_name, n):
    g = torch.Generator().manual_seed(n)
    images, noise = torch.randn(n, 2, 3, generator=g), torch.randn(n, 2, 3, generator=g)
    coupler = HungarianCoupling(cost=cost_name, backend=backend)
    out = coupler.pair(images, noise)
    idx = assert_row_permutation(out, noise)
    c = cost_matrix(images.flatten(1), noise.flatten(1), cost_name).double().numpy()
    assert assignment_cost(c, idx) == pytest.approx(brute_force_min(c), rel=1e-12)
    # stats are the mean pair costs of what was returned, computed independently
    d = (images - out).flatten(1).norm(dim=1).double()
    d0 = (images - noise).flatten(1).norm(dim=1).double()
    if cost_name == "sqeuclidean":
        d, d0 = d.square(), d0.square()
    s = coupler.last_stats
    assert s.n == n
    assert s.assigned_cost == pytest.approx(d.mean().item(), rel=1e-5)
    assert s.independent_cost == pytest.approx(d0.mean().item(), rel=1e-5)
    assert s.ratio == pytest.approx(s.assigned_cost / s.independent_cost)
    assert s.ratio <= 1 + 1e-12  # the identity is one of the permutations


@pytest.mark.parametrize("kind", ["random", "integer", "clustered_2d", "pixels_64d"])
def test_every_backend_finds_the_scipy_optimal_total(backend, kind):
    rng = np.random.default_rng(3)
    n = 80
    if kind == "random":
        cost = rng.random((n, n))
    elif kind == "integer":
        cost = rng.integers(0, 4, size=(n, n)).astype(np.float64)
    else:
        d = 2 if kind == "clustered_2d" else 64
        x = rng.normal(size=(n, d)) * 0.05 + rng.choice([-2.0, 2.0], size=(n, d))
        z = rng.normal(size=(n, d))
        cost = np.sqrt(((x[:, None] - z[None]) ** 2).sum(-1))
    reference = assignment_cost(cost, solve_assignment(cost, "scipy"))
    assert assignment_cost(cost, solve_assignment(cost, backend)) == pytest.approx(reference, rel=1e-12, abs=1e-9)


def test_pot_plan_that_mixes_two_optimal_permutations_is_read_back():
    cost = np.array([[1.0, 1.0, 5.0], [1.0, 1.0, 5.0], [5.0, 5.0, 0.0]])
    plan = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])  # not a vertex
    col = solvers._plan_to_permutation(plan, cost)
    assert sorted(col.tolist()) == [0, 1, 2]
    assert assignment_cost(cost, col) == brute_force_min(cost) == 2.0


def test_missing_backend_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(solvers._MODULE, "lapjv", "lapjv_module_that_is_not_installed")
    with pytest.raises(ImportError, match=re.escape("`pip install lapjv`")):
        solve_assignment(np.eye(3), "lapjv")
    with pytest.raises(ValueError, match="unknown assignment backend 'hungarian'"):
        solve_assignment(np.eye(3), "hungarian")
    with pytest.raises(ValueError, match="square"):
        solve_assignment(np.ones((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        solve_assignment(np.array([[0.0, np.nan], [1.0, 0.0]]))


def test_auto_rules(monkeypatch):
    installed = {"scipy", "lapjv", "pot"}
    monkeypatch.setattr(solvers, "backend_available", lambda name: name in installed)
    assert choose_backend(2048, data_dim=2) == "pot"
    assert choose_backend(64, data_dim=2) == "scipy"  # lapjv is slowest on low-dimensional costs
    assert choose_backend(64, data_dim=3072) == "lapjv"
    assert choose_backend(2048, data_dim=None) == "lapjv"
    installed.discard("lapjv")
    assert choose_backend(2048, data_dim=3072) == "pot"
    assert choose_backend(128, data_dim=3072) == "scipy"
    installed.discard("pot")
    assert choose_backend(2048, data_dim=2) == "scipy"


# ----------------------------------------------------------------------------------------- class-wise
def labelled_problem(seed: int):
    """Classes 0 (3 rows), 1 (4 rows), 3 (1 row, singleton); class 2 is empty."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 0, 3, 1, 0, 1, 0, 1])
    images, noise = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    return images, noise, labels


@pytest.mark.parametrize("cost_name", COSTS)
def test_classwise_stays_in_class_and_sums_per_class_optima(backend, cost_name):
    for seed in range(3):
        images, noise, labels = labelled_problem(seed)
        coupler = HungarianCoupling(cost=cost_name, backend=backend)
        out = coupler.pair(images, noise, labels)
        idx = assert_row_permutation(out, noise)
        assert (labels[idx] == labels).all()  # never across classes; singleton keeps its own noise
        assert idx[2] == 2
        c = cost_matrix(images, noise, cost_name).double().numpy()
        per_class = sum(brute_force_min(c[np.ix_(m, m)]) for k in range(4) for m in [np.flatnonzero(labels == k)])
        assert assignment_cost(c, idx) == pytest.approx(per_class, rel=1e-12)
        # the global (non class-wise) optimum can only be lower or equal
        free = HungarianCoupling(cost=cost_name, backend=backend, classwise=False).pair(images, noise, labels)
        assert assignment_cost(c, assert_row_permutation(free, noise)) == pytest.approx(brute_force_min(c))
        assert brute_force_min(c) <= per_class + 1e-12


def test_one_hot_labels_equal_integer_labels():
    images, noise, labels = labelled_problem(5)
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    coupler = HungarianCoupling(backend="scipy")
    torch.testing.assert_close(coupler.pair(images, noise, one_hot), coupler.pair(images, noise, labels))
    # EDM's unconditional convention: a [N, 0] label tensor means no classes
    unconditional = coupler.pair(images, noise, torch.zeros(8, 0))
    torch.testing.assert_close(unconditional, coupler.pair(images, noise))


def test_bad_labels_and_shapes_are_named():
    images, noise, labels = labelled_problem(0)
    coupler = HungarianCoupling()
    with pytest.raises(ValueError, match="labels: 7 rows for 8 images"):
        coupler.pair(images, noise, labels[:7])
    with pytest.raises(ValueError, match="integer class indices"):
        coupler.pair(images, noise, labels.float())
    with pytest.raises(ValueError, match=re.escape("noise: shape (8, 3) differs from images (8, 2)")):
        coupler.pair(images, torch.randn(8, 3))
    with pytest.raises(ValueError, match="cost: unknown coupling cost 'l1'"):
        HungarianCoupling(cost="l1")


def test_independent_is_identity_with_stats():
    images, noise, _ = labelled_problem(1)
    coupler = IndependentCoupling()
    assert coupler.pair(images, noise) is noise
    d0 = (images - noise).norm(dim=1).mean().item()
    assert coupler.last_stats.assigned_cost == pytest.approx(d0, rel=1e-6)
    assert coupler.last_stats.ratio == 1.0


# ------------------------------------------------------------------------------------------ 2-D toy
def eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    """8 Gaussians (std 0.1) on the circle of radius 2."""
    angle = torch.randint(0, 8, (n,), generator=g).double() * (2 * math.pi / 8)
    centres = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return (centres + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def test_ot_shortens_pairs_more_for_bigger_pools_on_8_gaussians():
    g = torch.Generator().manual_seed(0)
    ratios = {}
    for pool in (64, 512):
        r = []
        for _ in range(3):
            x, z = eight_gaussians(pool, g), torch.randn(pool, 2, generator=g)
            coupler = HungarianCoupling()
            coupler.pair(x, z)
            r.append(coupler.last_stats.ratio)
            assert coupler.last_stats.assigned_cost < coupler.last_stats.independent_cost
        ratios[pool] = float(np.mean(r))
    # the mini-batch OT cost decreases towards the population OT cost as the pool grows
    assert ratios[512] < ratios[64] < 1.0


# --------------------------------------------------------------------------------------- pool errors
def test_pool_size_errors_are_exact():
    assert validate_pool_size(512, 64) == 8
    assert validate_pool_size(512, 256, pools=4) == 8
    msg = (
        "--aot-pool 500 is not a multiple of --batch-gpu 64: each pool is consumed in slices of 64 rows, so 52 "
        "rows of every pool would never be trained on. Use --aot-pool 448 or 512, or a --batch-gpu that divides "
        "500 (e.g. 50 or 100)."
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        validate_pool_size(500, 64)
    msg = (
        "--aot-pool 32 is not a multiple of --batch-gpu 64: each pool is consumed in slices of 64 rows, so 32 "
        "rows of every pool would never be trained on. Use --aot-pool 64, or a --batch-gpu that divides 32 "
        "(e.g. 32)."
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        validate_pool_size(32, 64)
    msg = (
        "--aot-pool 500 is not a multiple of the per-pool slice 64 (--batch-gpu 256 / --aot-pools 4): each pool "
        "is consumed in slices of 64 rows, so 52 rows of every pool would never be trained on. Use --aot-pool 448 "
        "or 512, or a --batch-gpu whose slice divides 500 (e.g. --batch-gpu 200 or 400)."
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        validate_pool_size(500, 256, pools=4)
    msg = (
        "--batch-gpu 250 is not divisible by --aot-pools 4: every step takes the same number of rows from each "
        "pool. Use --batch-gpu 248 or 252."
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        validate_pool_size(512, 250, pools=4)
    source = TensorSource(torch.randn(10, 2))
    with pytest.raises(ValueError, match=re.escape("--aot-pool 500 is not a multiple of --batch-gpu 64")):
        PairedBatchStream(source, HungarianCoupling(), batch=64, pool_size=500, worker=False)
    with pytest.raises(ValueError, match=re.escape("--aot-pool 512: independent coupling pairs nothing")):
        PairedBatchStream(source, IndependentCoupling(), batch=64, pool_size=512, worker=False)


def _advice(message: str) -> tuple[list[int], list[int], list[int]]:
    """The --batch-gpu, --aot-pool and --aot-pools values an error message proposes."""
    use = message.split(" Use ", 1)[1] if " Use " in message else ""
    numbers = lambda text: [int(x) for x in re.findall(r"\d+", text)]  # noqa: E731
    example = re.search(r"\(e\.g\. ([^)]*)\)", use)  # "a --batch-gpu that divides P (e.g. A or B)"
    direct = re.match(r"--batch-gpu (\d+( or \d+)?)", use)  # "Use --batch-gpu A or B."
    batch_gpu = numbers(example.group(1)) if example else numbers(direct.group(1)) if direct else []
    pool = numbers(re.search(r"--aot-pool \d+( or \d+)?", use).group(0)) if "--aot-pool " in use else []
    pools = numbers(re.search(r"--aot-pools [\d, ]+( or \d+)?", use).group(0)) if "--aot-pools " in use else []
    return batch_gpu, pool, pools


def test_pool_layout_advice_is_always_followable_when_the_per_device_batch_is_known():
    """Every fix an error proposes passes the same check (and --batch-gpu divides the per-device batch): a user
    following the message never meets the next error. Brute force over small layouts."""
    refused = 0
    for per_device in (48, 64, 100, 128, 129):
        for batch_gpu in [b for b in range(1, per_device + 1) if per_device % b == 0]:
            for pools in (1, 2, 3, 4):
                for pool_size in (96, 256, 500, 512, 1797):
                    try:
                        validate_pool_size(pool_size, batch_gpu, pools, per_device=per_device)
                        continue
                    except ValueError as e:
                        message = str(e)
                    refused += 1
                    new_batch_gpu, new_pool, new_pools = _advice(message)
                    assert new_batch_gpu or new_pool or new_pools, message
                    for b in new_batch_gpu:
                        assert per_device % b == 0 and b % pools == 0, message
                        if pool_size % (b // pools) == 0:
                            assert validate_pool_size(pool_size, b, pools, per_device=per_device) >= 1
                    for p in new_pool:
                        assert validate_pool_size(p, batch_gpu, pools, per_device=per_device) >= 1, message
                    for k in new_pools:
                        assert per_device % k == 0, message
    assert refused > 100


def test_pool_layout_advice_for_the_cases_users_met():
    with pytest.raises(ValueError, match=re.escape("No --batch-gpu can be: the per-device batch 128 is not a "
                                                   "multiple of 3. Use --aot-pools 1, 2 or 4, or a --batch")):  # fmt: skip
        validate_pool_size(512, 128, 3, per_device=128)
    with pytest.raises(ValueError, match=re.escape("Use --aot-pools 1, or a --batch with a multiple of 2 per device.")):
        validate_pool_size(512, 5, 2, per_device=5)  # one count left: no dangling "or"
    with pytest.raises(ValueError, match=re.escape("Use --batch-gpu 6 or 12.")):  # 126 and 129 do not divide 12
        validate_pool_size(512, 8, 3, per_device=12)
    with pytest.raises(ValueError, match=re.escape("would never be trained on. Use --aot-pool 387 or 516.")):
        validate_pool_size(512, 129, per_device=129)  # 129 = 3 x 43: no useful --batch-gpu divides 512


def test_what_python_users_pass_is_read_as_meant():
    """An integer label column [N, 1] holds class indices (its argmax put every row in class 0 and paired across
    classes); inputs that require grad are paired (the permutation needs none); uint8 pixels are refused by
    TensorSource rather than paired with N(0, 1) noise."""
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    labels = torch.arange(64) % 4
    coupler = HungarianCoupling(classwise=True)
    perm_column, _ = coupler.assign(x, z, labels[:, None])
    perm_flat, _ = coupler.assign(x, z, labels)
    assert (labels[perm_column] == labels).all() and np.array_equal(perm_column, perm_flat)
    paired = HungarianCoupling().pair(x.clone().requires_grad_(), z)
    assert torch.equal(paired, HungarianCoupling().pair(x, z))
    with pytest.raises(ValueError, match=r"images: expected a floating-point torch tensor .* got torch.uint8"):
        TensorSource(torch.zeros(8, 1, 4, 4, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------- streams
class RecordingSource(TensorSource):
    """TensorSource that remembers every draw (to recompute the expected pairing independently)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.draws: list[PoolDraw] = []

    def draw(self, n):
        d = super().draw(n)
        self.draws.append(d)
        return d


def toy_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g)


def take(stream, k):
    return [stream.next() for _ in range(k)]


@pytest.mark.parametrize("pools", [1, 2])
@pytest.mark.parametrize("labelled", [False, True])
def test_slices_cover_each_pair_of_the_solved_pool_once(pools, labelled):
    images, labels = toy_data()
    source = RecordingSource(images, labels if labelled else None, seed=1)
    pool, batch = 8, 2 * pools
    with PairedBatchStream(source, HungarianCoupling(backend="scipy"), batch, pool, pools=pools) as stream:
        steps = stream.steps_per_pool
        assert steps == 4
        batches = take(stream, 2 * steps)
    part = batch // pools
    for t in range(2):  # two pools
        for k in range(pools):
            d = source.draws[t * pools + k]
            perm, _ = HungarianCoupling(backend="scipy").assign(d.images, d.noise, d.labels)
            rows = [b.images[k * part : (k + 1) * part] for b in batches[t * steps : (t + 1) * steps]]
            noises = [b.noise[k * part : (k + 1) * part] for b in batches[t * steps : (t + 1) * steps]]
            torch.testing.assert_close(torch.cat(rows), d.images, rtol=0, atol=0)  # each row once, in order
            torch.testing.assert_close(torch.cat(noises), d.noise[perm], rtol=0, atol=0)
            assert_row_permutation(torch.cat(noises), d.noise)
        assert [b.step_in_pool for b in batches[t * steps : (t + 1) * steps]] == list(range(steps))
        assert batches[t * steps].stats.index == t


class AugmentedSource(TensorSource):
    """TensorSource whose draws carry augmentation labels that name their image (column 0 = the image's first pixel)."""

    def draw(self, n):
        d = super().draw(n)
        aug = d.images.flatten(1)[:, :1].repeat(1, 9)
        return PoolDraw(d.images, d.noise, d.labels, aug)


@pytest.mark.parametrize("pools", [1, 2])
@pytest.mark.parametrize("worker", [False, True])
def test_labels_and_augment_labels_stay_with_their_image(pools, worker):
    """The assignment permutes only the noise: each image keeps its class and the augmentation that made it."""
    n = 40
    first = torch.arange(n, dtype=torch.float32) / n  # the first pixel names the image
    images = torch.randn(n, 1, 2, 2)
    images[:, 0, 0, 0] = first
    labels = torch.arange(n) % 3
    source = AugmentedSource(images, labels, seed=4)
    with PairedBatchStream(source, HungarianCoupling(backend="scipy"), 2 * pools, 8, pools=pools, worker=worker) as st:
        for b in take(st, 12):
            index = torch.round(b.images[:, 0, 0, 0] * n).long()
            torch.testing.assert_close(b.augment_labels[:, 0], b.images[:, 0, 0, 0], rtol=0, atol=0)
            assert torch.equal(b.labels, labels[index])


def test_global_scope_in_one_process_solves_the_union_of_virtual_pools():
    images, labels = toy_data()
    source = RecordingSource(images, labels, seed=2)
    with PairedBatchStream(source, HungarianCoupling(), 4, 8, pools=2, scope="global") as stream:
        batches = take(stream, 4)
    d0, d1 = source.draws[:2]
    all_images, all_noise = torch.cat([d0.images, d1.images]), torch.cat([d0.noise, d1.noise])
    perm, _ = HungarianCoupling().assign(all_images, all_noise, torch.cat([d0.labels, d1.labels]))
    got = torch.cat([torch.cat([b.noise[:2] for b in batches]), torch.cat([b.noise[2:] for b in batches])])
    torch.testing.assert_close(got, all_noise[perm], rtol=0, atol=0)


def run_stream(worker, total, interrupt_at=None, pools=1, coupler=None):
    """Concatenated (images, noise, labels) of ``total`` steps, optionally saved/rebuilt at ``interrupt_at``."""
    images, labels = toy_data()

    def build(seed):
        c = coupler or HungarianCoupling(backend="scipy")
        pool = None if isinstance(c, IndependentCoupling) else 6
        return PairedBatchStream(
            TensorSource(images, labels, seed=seed), c, 2 * pools, pool, pools=pools, worker=worker
        )

    stream = build(seed=3)
    out = []
    for step in range(total):
        if step == interrupt_at:
            state = stream.state_dict()
            stream.close()
            path_state = torch.load(_roundtrip(state), weights_only=True)  # the checkpoint format is plain data
            stream = build(seed=99)  # a different source seed: everything must come from the state
            stream.load_state_dict(path_state)
        out.append(stream.next())
    stream.close()
    return out


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.images, y.images, rtol=0, atol=0)
        torch.testing.assert_close(x.noise, y.noise, rtol=0, atol=0)
        torch.testing.assert_close(x.labels, y.labels, rtol=0, atol=0)
        assert x.stats.index == y.stats.index and x.step_in_pool == y.step_in_pool


@pytest.mark.parametrize("pools", [1, 2])
def test_worker_on_equals_worker_off_and_resume_is_exact(pools):
    total = 14  # 3 steps per pool: several pools
    reference = run_stream(worker=False, total=total, pools=pools)
    assert_same_batches(run_stream(worker=True, total=total, pools=pools), reference)
    for interrupt_at in (0, 2, 3, 7):  # before the first pool, mid-pool, at a pool boundary, later mid-pool
        for worker in (False, True):
            resumed = run_stream(worker=worker, total=total, interrupt_at=interrupt_at, pools=pools)
            assert_same_batches(resumed, reference)


def test_independent_stream_is_plain_batches_and_resumes():
    reference = run_stream(worker=False, total=5, coupler=IndependentCoupling())
    assert all(b.stats.steps == 1 and b.stats.coupling.ratio == 1.0 for b in reference)
    assert_same_batches(run_stream(worker=True, total=5, interrupt_at=2, coupler=IndependentCoupling()), reference)


def test_resume_refuses_other_settings():
    images, labels = toy_data()
    a = PairedBatchStream(TensorSource(images, labels), HungarianCoupling(), 2, 6, worker=False)
    a.next()
    b = PairedBatchStream(TensorSource(images, labels), HungarianCoupling(), 2, 8, worker=False)
    with pytest.raises(ValueError, match="saved with pool_size=6 but is now 8"):
        b.load_state_dict(a.state_dict())


def test_stream_stats_and_wait_are_recorded():
    images, labels = toy_data()
    with PairedBatchStream(TensorSource(images, labels), HungarianCoupling(), 2, 8) as stream:
        b = stream.next()
    assert isinstance(b.stats.coupling, CouplingStats)
    assert b.stats.coupling.n == 8 and b.stats.wait_ms >= 0 and b.stats.steps == 4
    assert b.stats.coupling.assigned_cost <= b.stats.coupling.independent_cost + 1e-9


def test_source_draw_of_wrong_size_is_refused():
    class Short(TensorSource):
        def draw(self, n):
            return super().draw(n - 1)

    stream = PairedBatchStream(Short(torch.randn(20, 2)), HungarianCoupling(), 2, 4, worker=False)
    with pytest.raises(ValueError, match=re.escape("source.draw(4) returned 3 images; it must return exactly 4")):
        stream.next()


def test_all_backends_listed():
    assert BACKENDS == ("scipy", "lapjv", "pot")
    assert "scipy" in available_backends() and set(available_backends()) <= set(BACKENDS)


def test_backend_tests_cover_every_backend_whether_installed_or_not(monkeypatch):
    """The solver tests take the ``backend`` fixture over all of BACKENDS, never over the installed ones only."""
    users = [f for name, f in globals().items() if name.startswith("test_") and "backend" in f.__code__.co_varnames]
    assert len(users) >= 5
    for f in users:
        params = [m.args for m in getattr(f, "pytestmark", []) if m.name == "parametrize" and "backend" in m.args[0]]
        assert not params, f"{f.__name__} parametrises 'backend' itself; use the fixture over all BACKENDS"
    # a missing solver is a skip that says how to install it
    monkeypatch.setitem(globals(), "backend_available", lambda name: name == "scipy")
    for name, package in (("lapjv", "lapjv"), ("pot", "pot")):
        with pytest.raises(pytest.skip.Exception, match=rf"^{name} not installed: pip install {package}$"):
            require_backend(name)
