"""What a stage trains on: the cache stream joined with the records (KD stages), the records alone (stages without
a cache), or the records with an online teacher (the exact-target reference). Each yields micro-batches with the
tags that let the loop report what it consumed, and saves / restores its position for exact resume."""

from __future__ import annotations

import logging

import torch

from kd_cache.codec import TargetLayout, sample_from_targets
from kd_cache.data import RecordSource
from kd_cache.format import TargetSpec
from kd_cache.reader import Cache
from kd_cache.targets import TargetOptions
from kd_train.batch import Batch, cross_training_example, make_batch, training_example
from kd_train.cross import CrossTokenizer
from kd_train.config import TrainConfig
from kd_train.records import EpochSampler, RecordDataset, per_rank_count
from kd_train.stream import TAG_KEYS, CacheStream, collate_tags, ensure_nonempty

log = logging.getLogger("kd_train")


def cache_target_layout(cache: Cache) -> TargetLayout:
    """What the cache's per-row targets are: the one place the trainer reads them from a cache."""
    return TargetLayout(text=cache.text_spec, visual=cache.visual_spec, vocab_size=cache.manifest.vocab_size)


class CacheData:
    """KD stages: the cache stream joined with the data's records and images."""

    def __init__(self, cfg: TrainConfig, encoder, acc, pad_id: int, cache: Cache | None = None,
                 cross: CrossTokenizer | None = None):
        # the cache opened once per process (by `kd train`'s preflight); its DataLoader workers reopen it
        self.cache = ensure_nonempty(cache if cache is not None else cfg.cache)
        self.records = RecordSource(cfg.data)
        records, pad, layout = self.records, pad_id, cache_target_layout(self.cache)

        def transform(s: dict) -> dict:
            index = int(s["sample_index"])
            encoded = encoder.encode(records[index], index, images=s["images"])
            # a student of another tokenizer: its own tokens, the cached targets regrouped by bytes
            example = (training_example(encoded, s, layout) if cross is None
                       else cross_training_example(encoded, s, layout, cross))
            example.update({k: s[k] for k in s if k in TAG_KEYS})
            return example

        kw = dict(records=self.records, image_root=cfg.images, world_size=acc.num_processes, seed=cfg.seed,
                  shuffle_buffer=cfg.shuffle_buffer, skip_missing_images=cfg.skip_missing_images,
                  skip_corrupt_shards=cfg.skip_corrupt_shards)
        self.stream = CacheStream(self.cache, rank=acc.process_index, transform=transform, **kw)
        # Shares differ by up to a shard: every rank takes the smallest share's number of steps.
        self.per_rank = min(self.stream.num_samples(rank=r) for r in range(acc.num_processes))
        self.cfg, self.pad = cfg, pad

    def loader(self, epoch: int):
        self.stream.set_epoch(epoch)
        return torch.utils.data.DataLoader(self.stream, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
                                           collate_fn=self._collate, persistent_workers=False)

    def _collate(self, items: list[dict]):
        return make_batch(items, self.pad), collate_tags(items)

    def materialize(self, batch: Batch) -> Batch:
        """The micro-batch the loop trains on (the collated one: the cache holds its targets)."""
        return batch

    def mark(self, tags) -> None:
        self.stream.mark_consumed(tags)

    def state(self) -> dict:
        return self.stream.state_dict()

    def load(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def stats(self) -> dict:
        return self.stream.stats


class RecordData:
    """Stages without a cache (SFT, baseline): the data file itself, a seeded permutation per epoch."""

    def __init__(self, cfg: TrainConfig, encoder, acc, pad_id: int):
        self.records = RecordSource(cfg.data)
        if len(self.records) == 0:
            raise ValueError(f"data {cfg.data} holds no samples")
        self.dataset = RecordDataset(self.records, encoder)
        self.per_rank = per_rank_count(len(self.records), acc.num_processes)
        self.cfg, self.acc, self.pad = cfg, acc, pad_id
        self.epoch, self.consumed, self.skipped = 0, 0, 0

    def loader(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0
        sampler = EpochSampler(len(self.records), seed=self.cfg.seed, epoch=epoch, rank=self.acc.process_index,
                               world_size=self.acc.num_processes, consumed=self.consumed, per_rank=self.per_rank)
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=sampler,
                                           num_workers=self.cfg.num_workers, collate_fn=self._collate)

    def _collate(self, items: list[dict]):
        good = [it for it in items if "skip" not in it]
        return (make_batch(good, self.pad) if good else None), _record_tags(items)

    def materialize(self, batch: Batch) -> Batch:
        """The micro-batch the loop trains on (the collated one: CE needs no targets)."""
        return batch

    def mark(self, tags) -> None:
        self.consumed += tags["n"]
        self.skipped += tags["skipped"]
        for index, detail in tags.get("skips", ()):  # reported as they happen, as `kd cache build` does
            log.warning("skipped record %d of %s: %s", index, self.cfg.data, detail)

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "skipped": self.skipped}

    def load(self, state: dict) -> None:
        self.epoch, self.consumed, self.skipped = state["epoch"], state["consumed"], state.get("skipped", 0)

    def stats(self) -> dict:
        return {"skipped_samples": self.skipped}


class OnlineData(RecordData):
    """The online reference: the teacher runs on every micro-batch (in the training process, like the paper's
    code) and its targets are computed exactly as the cache builder computes them, minus quantization."""

    def __init__(self, cfg: TrainConfig, encoder, acc, pad_id: int, teacher, teacher_encoder):
        super().__init__(cfg, encoder, acc, pad_id)
        self.dataset.teacher_encoder = teacher_encoder
        self.teacher = teacher
        vocab = teacher.vocab_size
        self.k = cfg.online_top_k or vocab
        self.kv = cfg.online_visual_top_k or vocab
        # top-k targets on both row kinds, the teacher's whole vocabulary unless --online-top-k says otherwise
        self.layout = TargetLayout(text=TargetSpec("topk", k=self.k), visual=TargetSpec("topk", k=self.kv),
                                   vocab_size=vocab)
        self.options = TargetOptions(text_kind="topk", text_k=self.k, visual_kind="topk", visual_k=self.kv,
                                     vocab_size=vocab, gram_lowrank=False)

    def _collate(self, items: list[dict]):
        good = [it for it in items if "skip" not in it]
        return (good or None), _record_tags(items)

    def materialize(self, items: list[dict]) -> Batch:
        """Teacher forward on the micro-batch -> the same targets a cache row would hold -> a Batch."""
        results = self.teacher.targets([(i, it["teacher"]) for i, it in enumerate(items)], self.options)
        examples = [training_example(it["encoded"], sample_from_targets(r), self.layout)
                    for it, r in zip(items, results)]
        return make_batch(examples, self.pad)


def _record_tags(items: list[dict]) -> dict:
    """What the loop reports of a micro-batch of records: how many, and which were skipped and why."""
    skips = [(int(it["index"]), it.get("detail") or it["skip"]) for it in items if "skip" in it]
    return {"n": len(items), "skipped": len(skips), "skips": skips}
