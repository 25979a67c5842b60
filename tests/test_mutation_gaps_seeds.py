"""Which images and videos each rank samples in data parallel, and from which seeds, without starting processes.

Mutation testing (benchmarks/README.md) found the shares tested only on two ranks and from batch-aligned starts, and
the seed rule only through a launched job. Here a pipeline stand-in draws item i from ``seed + i`` (as the real
ones do), so a wrong seed or share shows as a wrong value; the world's gather is replaced by a record of what
each rank hands it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from starflow_mlx.apps.generate_distributed import default_batch, sample_images, sample_videos
from starflow_mlx.io.distributed import World


@dataclass
class Recorded(World):
    """A rank whose gather records its items and counts; rank 0 gets back only its own items."""

    handed: list = field(default_factory=list)

    worked: list = field(default_factory=list)

    def gather(self, mine, counts, worked):
        self.handed.append((None if mine is None else mine.copy(), list(counts)))
        self.worked.append(worked)
        return mine if self.is_main else None


def single_process_cuts(items: range, batch: int) -> list[range]:
    """The batches one process samples: cut at multiples of ``batch`` (counted from 0), by hand."""
    if not items:
        return []
    edges = [items.start] + [i for i in items if i > items.start and i % batch == 0] + [items.stop]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("items", [range(0, 7), range(3, 10), range(5, 6), range(1, 13), range(0, 0)])
@pytest.mark.parametrize("batch", [1, 2, 4, 16])
def test_shares_are_contiguous_whole_batches_in_rank_order(size, items, batch):
    shares = World(size=size).batches(items, batch)
    cuts = single_process_cuts(items, batch)
    assert len(shares) == size
    assert [i for share in shares for i in share] == list(items)  # every item once, in order, no overlap
    taken = [sum(1 for c in cuts if c.start in share) for share in shares]
    assert all(share.start == cuts[sum(taken[:r])].start for r, share in enumerate(shares) if len(share))
    assert taken == [len(cuts) // size + (r < len(cuts) % size) for r in range(size)]  # the first take one more


def test_shares_by_hand_on_three_ranks_and_from_an_unaligned_start():
    assert World(size=3).batches(range(7), 2) == [range(0, 4), range(4, 6), range(6, 7)]
    assert World(size=3).batches(range(5), 2) == [range(0, 2), range(2, 4), range(4, 5)]
    # Resuming from image 3 with batches of 4: one process samples [3, 4) then [4, 8) then [8, 10).
    assert World(size=2).batches(range(3, 10), 4) == [range(3, 8), range(8, 10)]
    assert World(size=3).batches(range(3, 10), 4) == [range(3, 4), range(4, 8), range(8, 10)]


class VideoPipe:
    """Video i of a call is drawn from ``seed + i``: its pixels hold that number, decoded in two chunks of frames."""

    def __init__(self):
        self.calls = []

    def stream(self, prompt, *, progress=None, seed, num_videos, **options):
        self.calls.append(dict(options, prompt=prompt, progress=progress, seed=seed, num_videos=num_videos))
        value = (seed + np.arange(num_videos, dtype=np.uint8)).reshape(-1, 1, 1, 1, 1)
        yield np.broadcast_to(value, (num_videos, 2, 2, 2, 3)).copy()  # frames 0-1
        yield np.broadcast_to(value, (num_videos, 1, 2, 2, 3)).copy()  # frame 2


@pytest.mark.parametrize("count,size,shares", [(5, 3, [range(0, 2), range(2, 4), range(4, 5)]),
                                               (5, 2, [range(0, 3), range(3, 5)]),
                                               (7, 4, [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]),
                                               (2, 3, [range(0, 1), range(1, 2), range(2, 2)])])
def test_each_ranks_videos_are_drawn_from_the_seeds_one_process_gives_them(count, size, shares):
    for rank, share in enumerate(shares):
        world, pipe = Recorded(rank=rank, size=size), VideoPipe()
        before = time.perf_counter()
        got = sample_videos(world, pipe, "a fox", {"seed": 40, "num_videos": count, "frames": 3}, print)
        [(mine, counts)] = world.handed
        assert 0 <= world.worked[0] <= time.perf_counter() - before  # this rank's own seconds, for the gather's wait
        assert counts == [len(s) for s in shares]
        if not len(share):  # a rank with nothing to do samples nothing and hands in nothing
            assert pipe.calls == [] and mine is None
            continue
        assert pipe.calls == [{"prompt": "a fox", "progress": print, "seed": 40 + share.start,
                               "num_videos": len(share), "frames": 3}]
        assert mine.shape == (len(share), 3, 2, 2, 3)  # the chunks joined along frames
        assert mine[:, :, 0, 0, 0].tolist() == [[40 + i] * 3 for i in share]
        if rank == 0:
            assert len(got) == 1 and np.array_equal(got[0], mine)
        else:
            assert got is None


class ImagePipe:
    """Image i is drawn from ``seed + i``; batches cut at multiples of ``batch_size`` as in one process."""

    def __init__(self):
        self.calls = []

    def generate_batches(self, prompt, *, progress=None, batch_size, images, seed):
        self.calls.append((prompt, progress, batch_size, images))
        for cut in single_process_cuts(range(*images), batch_size):
            yield cut.start, [np.full((2, 2, 3), seed + i, np.uint8) for i in cut]


def test_each_ranks_images_are_its_share_of_the_job_from_seed_plus_index():
    wanted, batch = range(3, 12), 2  # from image 3 (a resumed job): batches [3,4) [4,6) [6,8) [8,10) [10,12)
    shares = World(size=3).batches(wanted, batch)
    assert shares == [range(3, 6), range(6, 10), range(10, 12)]
    for rank, share in enumerate(shares):
        world, pipe, stages = Recorded(rank=rank, size=3), ImagePipe(), []
        report = lambda *args: stages.append(args)  # noqa: E731
        before = time.perf_counter()
        got = sample_images(world, pipe, "a fox", {"seed": 7}, wanted, batch, report)
        [(mine, counts)] = world.handed
        assert 0 <= world.worked[0] <= time.perf_counter() - before
        assert pipe.calls == [("a fox", report, batch, (share.start, share.stop))] and counts == [3, 4, 2]
        done = [len(c) for c in single_process_cuts(share, batch)]  # the bar moves by whole batches
        assert stages == [("images", sum(done[:k]), len(share)) for k in range(len(done) + 1)]
        assert mine[:, 0, 0, 0].tolist() == [7 + i for i in share]
        if rank == 0:
            assert [np.asarray(image)[0, 0, 0] for image in got] == [7 + i for i in share]
        else:
            assert got is None


def test_a_rank_with_no_images_samples_none_and_says_so_to_the_gather():
    world, pipe = Recorded(rank=2, size=3), ImagePipe()
    assert sample_images(world, pipe, "a fox", {"seed": 7}, range(0, 2), 16, lambda *a, **k: None) is None
    assert pipe.calls == [] and world.handed == [(None, [2, 0, 0])]


def test_the_default_batch_is_an_even_share_only_in_data_parallel():
    two = World(size=2)
    assert default_batch(two, None, None, range(5)) == 3  # ceil(5 / 2): one batch per rank
    assert default_batch(World(size=3), None, None, range(3, 10)) == 3
    assert default_batch(two, None, 4, range(5)) == 4  # asked for: kept
    assert default_batch(two, range(0, 2), None, range(5)) is None  # pipeline parallel: every rank samples all
    assert default_batch(World(size=1), None, None, range(5)) is None  # one process: the pipeline's own default
