"""A deterministic, resumable (and rank-aware) sampler.

The order of epoch ``e`` is a permutation seeded by ``seed + e``, so a resumed run can skip
exactly the samples already consumed and see the same batches as an uninterrupted run.
"""

from __future__ import annotations
from mas.errors import ConfigError

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one rank, resumable mid-epoch.

    Args:
        dataset_len (int): number of items.
        shuffle (bool): shuffle each epoch.
        seed (int): base seed; epoch ``e`` uses ``seed + e``.
        rank (int): this process's rank.
        world_size (int): number of ranks; each gets every ``world_size``-th index of the
            epoch order (the tail that does not divide evenly is dropped).
    """

    def __init__(self, dataset_len: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if dataset_len < world_size:
            raise ConfigError(f"{dataset_len} items cannot be split over {world_size} ranks")
        self.dataset_len = dataset_len
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s order, skipping the first ``start`` indices of this rank."""
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self.dataset_len // self.world_size - self.start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        per_rank = self.dataset_len // self.world_size
        mine = order[self.rank : per_rank * self.world_size : self.world_size]
        return iter(mine[self.start :])
