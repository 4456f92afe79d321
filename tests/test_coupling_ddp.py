"""Global coupling scope over two gloo processes equals one process solving the concatenated pools."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aotdiff.coupling import HungarianCoupling, PairedBatchStream, TensorSource

WORLD, POOL, BATCH, STEPS = 2, 8, 4, 6  # 2 steps per pool, 3 pools


def rank_data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(24, 3, 2, generator=g), torch.randint(0, 3, (24,), generator=g)


class RecordingSource(TensorSource):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.draws = []

    def draw(self, n):
        d = super().draw(n)
        self.draws.append({"images": d.images, "noise": d.noise, "labels": d.labels})
        return d


def build(rank: int, worker: bool) -> PairedBatchStream:
    images, labels = rank_data(rank)
    source = RecordingSource(images, labels, seed=rank)
    return PairedBatchStream(source, HungarianCoupling(backend="scipy"), BATCH, POOL, scope="global", worker=worker)


def worker_main(rank: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        stream = build(rank, worker=True)
        batches = [stream.next() for _ in range(STEPS)]
        draws = stream.source.draws[: STEPS * BATCH // POOL]
        stream.close()
        # resume mid-pool under the global scope: the collectives replay in the same order on both ranks
        first = build(rank, worker=False)
        head = [first.next() for _ in range(3)]
        state = first.state_dict()
        first.close()
        second = build(rank, worker=True)
        second.load_state_dict(state)
        resumed = head + [second.next() for _ in range(STEPS - 3)]
        second.close()
        torch.save(
            {
                "noise": torch.cat([b.noise for b in batches]),
                "images": torch.cat([b.images for b in batches]),
                "resumed_noise": torch.cat([b.noise for b in resumed]),
                "ratio": [b.stats.coupling.ratio for b in batches],
                "draws": draws,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out_dir: str, timeout_s: float = 60.0) -> None:
    ctx = mp.spawn(worker_main, args=(free_port(), out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the {WORLD} gloo processes did not finish within {timeout_s} s")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_global_scope_equals_single_process_solve(tmp_path):
    spawn(str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    steps_per_pool = POOL // BATCH
    for t in range(STEPS // steps_per_pool):  # each pool
        rows = slice(t * POOL, (t + 1) * POOL)
        draws = [res["draws"][t] for res in results]
        images = torch.cat([d["images"] for d in draws])
        noise = torch.cat([d["noise"] for d in draws])
        labels = torch.cat([d["labels"] for d in draws])
        coupler = HungarianCoupling(backend="scipy")
        expected = coupler.pair(images, noise, labels)  # one process holding the concatenated pool
        for r, res in enumerate(results):
            torch.testing.assert_close(res["images"][rows], images[r * POOL : (r + 1) * POOL], rtol=0, atol=0)
            torch.testing.assert_close(res["noise"][rows], expected[r * POOL : (r + 1) * POOL], rtol=0, atol=0)
            assert res["ratio"][t * steps_per_pool] == pytest.approx(coupler.last_stats.ratio)
        # every gathered noise row is used exactly once across the ranks
        used = torch.cat([res["noise"][rows] for res in results])
        same = (used.flatten(1)[:, None] == noise.flatten(1)[None]).all(-1)
        assert (same.sum(0) == 1).all() and (same.sum(1) == 1).all()
        # class-wise still applies to the union: a row only meets noise drawn for its class
        assert torch.equal(labels[same.int().argmax(1)], labels)
    for res in results:
        torch.testing.assert_close(res["resumed_noise"], res["noise"], rtol=0, atol=0)
