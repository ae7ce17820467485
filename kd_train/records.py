"""Training data straight from the dataset (stages that need no cache: SFT and the baseline).

A seeded permutation per epoch, split by rank; the resume state is just (epoch, samples consumed), because a
map-style DataLoader hands samples to the loop in sampler order whatever the number of workers.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kd_cache.data import Encoder, RecordSource, SkipSample, load_images
from kd_train.batch import training_example

log = logging.getLogger("kd_train")


class RecordDataset(torch.utils.data.Dataset):
    """Index -> the training example of one record, or None when the sample is skipped (counted by the loop)."""

    def __init__(self, records: RecordSource, encoder: Encoder):
        self.records, self.encoder = records, encoder
        self.teacher_encoder: Encoder | None = None  # set in the online-teacher reference mode


    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        try:
            record = self.records[index]
            images = load_images(record, self.encoder.image_root)
            out = training_example(self.encoder.encode(record, index, images=images))
            if self.teacher_encoder is not None:
                out["teacher"] = self.teacher_encoder.encode(record, index, images=images)
            return out
        except SkipSample as e:
            return {"skip": e.reason, "index": index, "detail": str(e)}


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded permutation, starting after `consumed` samples (exact resume)."""

    def __init__(self, n: int, *, seed: int, epoch: int, rank: int, world_size: int, consumed: int = 0,
                 per_rank: int | None = None):
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        mine = perm[rank::world_size]
        self.indices = mine[: per_rank if per_rank is not None else len(mine)][consumed:].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def per_rank_count(n: int, world_size: int) -> int:
    """Samples every rank gets (equal across ranks, so DDP ranks take the same number of steps)."""
    return n // world_size
