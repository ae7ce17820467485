"""The training loop of one stage on accelerate: data, optimizer step, metrics, checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import logging
import os
import shutil
import sys
import time
import traceback

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from safetensors import SafetensorError
from transformers import AutoTokenizer

from kd_cache.data import RecordSource
from kd_cache.errors import StorageError, describe
from kd_cache.files import save_json
from kd_cache.hf import pad_token_id, tokenizer_fingerprint, tokenizer_of
from kd_cache.progress import progress, quiet_library_bars
from kd_cache.reader import Cache
from kd_cache.teacher import Teacher
from kd_train.batch import encoder_for
from kd_train.checkpoint import (STATE_NAME, abort_checkpoint, begin_checkpoint, checkpoint_paths, commit_checkpoint,
                                 complete_checkpoints, prune_checkpoints, publish_folder, read_state,
                                 remove_partial)
from kd_train.compat import require_compatible
from kd_train.config import TrainConfig
from kd_train.cross import CrossTokenizer
from kd_train.objective import TERMS, Objective, RowLogits, StepCounts, zero_loss
from kd_train.schedule import cosine_with_warmup
from kd_train.sources import CacheData, OnlineData, RecordData
from kd_train.stream import ensure_nonempty
from kd_train.plan import StagePlan
from kd_train.lora import add_lora, merge_lora
from kd_train.student import (enable_gradient_checkpointing, load_student, parameter_counts, save_student,
                              set_trainable)
from kd_train.tracking import make_trackers
from kd_train.validate import answer_nll

log = logging.getLogger("kd_train")


class StageRunner:
    """One planned stage (kd_train/plan.py); `fit()` trains it and writes `<out>/final`. Built in named steps:
    accelerator, model (what trains, LoRA, checkpointing), data, schedule, optimizer, objective, validation."""

    def __init__(self, plan: StagePlan, cache: Cache | None = None):
        self.plan, self.cfg, self.preset, self.out = plan, plan.config, plan.preset, plan.out
        self.loss_cfg = plan.loss
        for note in plan.notes:
            log.warning("stage %s: %s", plan.name, note)
        self.acc = self._make_accelerator()
        set_seed(self.cfg.seed)
        quiet_library_bars()  # no loading bar frames in a log file (stderr not a terminal)
        self.model, self.processor = load_student(plan.student)
        self.lora = self._prepare_model()
        self.pad = pad_token_id(tokenizer_of(self.processor))
        self.data = self._make_data(cache)
        self.steps_per_epoch, self.total_steps = self._count_steps()
        self.optimizer, self.scheduler = self._make_optimizer()
        self.wrapped, self.optimizer, self.scheduler = self.acc.prepare(RowLogits(self.model), self.optimizer,
                                                                        self.scheduler)
        self._make_objective()
        self.sharded = shards_parameters(self.acc)
        self.sync_dropped = 0  # samples of micro-batches dropped on every rank to keep a sharded run's forwards equal
        self.step = 0
        self.epoch = 0
        # held-out teacher-forced answer NLL (--val-data), and the best weights so far (--keep-best)
        self.val = self._make_validation()
        self.val_history: list[dict] = []
        self.best: tuple[float, int, dict] | None = None  # (val nll, step, CPU state_dict)

    def _make_accelerator(self) -> Accelerator:
        cfg = self.cfg
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        # jsonl (kd's own) and any tracker accelerate supports by name (kd_train/tracking.py)
        trackers, self.jsonl = make_trackers(cfg.tracker_list(), self.plan.name, self.out)
        # cpu=True is what makes accelerate form a gloo process group from torchrun-style env on GPU-less hosts;
        # a collective that waits longer than KD_DIST_TIMEOUT (a peer died or hangs) fails instead of waiting forever
        timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=collective_timeout()))
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp, log_with=trackers or None,
                           project_dir=self.out, kwargs_handlers=[timeout])

    def _prepare_model(self):
        """What trains (from the plan), LoRA adapters on the LLM, gradient checkpointing. Returns the LoRA tuner
        (merged into the stage's output at the end), or None."""
        plan, cfg = self.plan, self.cfg
        counts = set_trainable(self.model, vision=plan.train_vision, projector=plan.train_projector,
                               llm=plan.train_llm)
        lora = None
        if cfg.lora_r and plan.train_llm:  # the LLM trains through adapters; merged into the stage's output
            lora = add_lora(self.model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_target_list(),
                            dropout=cfg.lora_dropout, vision=plan.train_vision, projector=plan.train_projector)
            counts = {**parameter_counts(self.model),
                      "lora": sum(p.numel() for n, p in self.model.named_parameters() if "lora_" in n)}
        elif cfg.lora_r:
            log.info("stage %s: the LLM is frozen here, so no LoRA adapters", plan.name)
        if cfg.gradient_checkpointing:
            on = enable_gradient_checkpointing(self.model, vision=plan.train_vision)
            log.info("stage %s: gradient checkpointing on the %s", plan.name, " and ".join(on))
        log.info("stage %s: trainable parameters %s", plan.name, counts)
        return lora

    def _encoder(self, images: str | None):
        return encoder_for(self.processor, self.model.config, image_root=images, max_length=self.plan.max_length,
                           append_eos=self.plan.append_eos)

    def _make_data(self, cache: Cache | None):
        """The stage's micro-batches: the cache stream (checked against the student first), the records with the
        online teacher, or the records alone."""
        plan, cfg = self.plan, self.cfg
        encoder = self._encoder(cfg.images)
        self.cross = None
        if plan.source == "online":
            return self._online_data(cfg, encoder, self.pad, plan.max_length)
        if plan.source == "records":
            return RecordData(cfg, encoder, self.acc, self.pad)
        cache = cache if cache is not None else ensure_nonempty(cfg.cache)
        same = plan.cross_tokenizer == "off"
        require_compatible(cache, self.processor, self.model.config, same_tokenizer=same)
        self.cross = None if same else self._cross_tokenizer(cache)
        return CacheData(cfg, encoder, self.acc, self.pad, cache, cross=self.cross)

    def _cross_tokenizer(self, cache: Cache) -> CrossTokenizer:
        """The student's tokenizer against the teacher's: the cache's own copy (format v3) or --teacher-tokenizer."""
        folder = self.cfg.teacher_tokenizer or cache.teacher_tokenizer_folder()
        teacher_tok = AutoTokenizer.from_pretrained(folder)
        log.info("stage %s: %s across tokenizers (teacher tokenizer from %s)", self.plan.name,
                 self.plan.cross_tokenizer, folder)
        return CrossTokenizer(teacher_tok, tokenizer_of(self.processor), self.plan.cross_tokenizer,
                              self.plan.manifest.vocab_size)

    def _count_steps(self) -> tuple[int, int]:
        """(optimizer steps per epoch, steps of the stage) from each rank's share of the data."""
        cfg = self.cfg
        per_step = cfg.batch_size * cfg.grad_accum
        per_epoch = self.data.per_rank // per_step
        if per_epoch == 0:
            raise ValueError(f"each of {self.acc.num_processes} process(es) gets {self.data.per_rank} samples, fewer "
                             f"than one optimizer step (batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum}); "
                             "lower them or add data")
        total = per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        return per_epoch, total

    def _make_optimizer(self):
        """AdamW over what trains, and the warmup + cosine schedule."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {self.plan.name} trains no parameter: check the student's module names")
        optimizer = torch.optim.AdamW(params, lr=self.plan.lr, weight_decay=self.cfg.weight_decay)
        total, warmup = self.total_steps, int(round(self.cfg.warmup_ratio * self.total_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
        return optimizer, scheduler

    def _make_objective(self) -> None:
        """The stage's loss; the row-chunked one applies the head outside the wrapped forward (its gradients still
        reach DDP), in the autocast dtype the wrapped forward runs in."""
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.acc.mixed_precision)
        self.objective = Objective.for_student(self.loss_cfg, self.model, chunk_size=self.plan.chunk_size,
                                               amp_dtype=amp_dtype)
        if self.cross is not None:
            self.objective.cross = (self.cross.mode, self.cross.mapping)

    def _make_validation(self):
        cfg = self.cfg
        if cfg.val_data is None:
            return None
        return RecordSource(cfg.val_data), self._encoder(cfg.val_images or cfg.images), self.pad

    def _online_data(self, cfg: TrainConfig, encoder, pad: int, max_length):
        teacher = Teacher(cfg.online_teacher, device=str(self.acc.device), dtype="float32"
                          if self.acc.mixed_precision == "no" else "bfloat16")
        teacher.model.requires_grad_(False)
        have, want = tokenizer_fingerprint(self.processor), tokenizer_fingerprint(teacher.processor)
        if have["fingerprint"] != want["fingerprint"]:
            raise ValueError(f"online teacher {cfg.online_teacher} and the student tokenize differently "
                             f"(fingerprints {want['fingerprint']} vs {have['fingerprint']})")
        t_encoder = encoder_for(teacher.processor, teacher.config, image_root=cfg.images, max_length=max_length,
                                append_eos=encoder.append_eos)
        return OnlineData(cfg, encoder, self.acc, pad, teacher, t_encoder)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """`<out>/checkpoints/step-N/`, crash-safe (kd_train/checkpoint.py): written into `step-N.tmp/`, its
        trainer_state.json last, fsynced, renamed into place; older ones pruned only after. A failed write (ENOSPC:
        an OSError, torch's RuntimeError, a SafetensorError) removes its temporary folder and fails with one error
        naming the checkpoint a rerun resumes from."""
        tmp, final = checkpoint_paths(self.out, self.step)
        try:
            if self.acc.is_main_process:
                begin_checkpoint(tmp)
            self.acc.wait_for_everyone()
            self.acc.save_state(tmp)
            # every rank's data position: gathered so that any rank can resume its own
            states = _gather_objects(self.acc, self.data.state())
            if self.acc.is_main_process:
                save_json(os.path.join(tmp, STATE_NAME), {"step": self.step, "epoch": self.epoch, "data": states,
                                                          "total_steps": self.total_steps})
                commit_checkpoint(tmp, final)
        except BaseException as e:
            if self.acc.is_main_process:
                abort_checkpoint(tmp)
            if not isinstance(e, (OSError, RuntimeError, SafetensorError)) or isinstance(e, StorageError):
                raise
            done = complete_checkpoints(self.out)
            kept = (f"the last complete checkpoint, {done[-1][1]}, is intact and a rerun resumes from it" if done
                    else "there is no earlier checkpoint: a rerun starts the stage over")
            raise StorageError(f"writing checkpoint {final} failed ({describe(e)}); {kept}") from e
        if self.acc.is_main_process:
            prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()

    def maybe_resume(self) -> None:
        if self.acc.is_main_process:
            for path in remove_partial(self.out):
                log.info("removed %s, left by a checkpoint write that did not finish", path)
        found = complete_checkpoints(self.out)  # malformed names, stray files and unreadable states are skipped
        if not found:
            return
        ckpt = found[-1][1]
        state = read_state(ckpt)
        if state is None:
            raise ValueError(f"checkpoint {ckpt} changed while it was read; rerun")
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"checkpoint {ckpt} belongs to a run of {state['total_steps']} steps, this one has "
                             f"{self.total_steps}; use another --out or the original settings")
        if len(state["data"]) != self.acc.num_processes:
            raise ValueError(f"checkpoint {ckpt} was written by {len(state['data'])} processes, this run has "
                             f"{self.acc.num_processes}; resume with the original number of processes")
        self.acc.load_state(ckpt)
        self.step, self.epoch = state["step"], state["epoch"]
        self.data.load(state["data"][self.acc.process_index])
        if self.jsonl is not None and self.acc.is_main_process:
            self.jsonl.drop_after(self.step)
        log.info("resumed stage %s from %s (step %d)", self.preset.name, ckpt, self.step)

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> None:
        cfg, acc = self.cfg, self.acc
        os.makedirs(self.out, exist_ok=True)
        if acc.is_main_process:
            save_json(os.path.join(self.out, "train_config.json"),
                      {"stage": self.preset.name, "preset": self.preset.__dict__, "config": cfg.__dict__,
                       "loss": self.loss_cfg.__dict__, "total_steps": self.total_steps,
                       # what an unset option resolved to on this machine (`kd_train.config.loss_chunk_size_for`)
                       "loss_chunk_size": self.plan.chunk_size})
        acc.init_trackers(f"kd-{self.preset.name}", config={"stage": self.preset.name, **{
            k: v for k, v in cfg.__dict__.items() if isinstance(v, (int, float, str, bool))}})
        self.maybe_resume()

        # a bar on a terminal, a plain line every 30 s in a log file (kd_cache/progress.py)
        bar = progress(self.total_steps, self.step, desc=f"kd train {self.preset.name}", unit="step",
                       enabled=cfg.progress and acc.is_main_process)
        self.wrapped.train()
        while self.step < self.total_steps and self.epoch < cfg.epochs:
            batches = iter(self.data.loader(self.epoch))
            epoch_end = min(self.total_steps, (self.epoch + 1) * self.steps_per_epoch)
            while self.step < epoch_end:
                t0 = time.perf_counter()
                group = list(itertools.islice(batches, cfg.grad_accum))
                full = torch.tensor([1.0 if len(group) == cfg.grad_accum else 0.0], device=acc.device)
                if acc.reduce(full, reduction="min").item() < 1:
                    log.warning("epoch %d ran short of samples on some rank (skips); next epoch", self.epoch)
                    break
                metrics = self._optimizer_step(group)
                if metrics is None:  # nothing to train on anywhere: not a step (and not logged as a perfect one)
                    continue
                self.step += 1
                metrics.update(lr=self.scheduler.get_last_lr()[0], epoch=self.epoch,
                               step_seconds=time.perf_counter() - t0)
                metrics["tokens_per_second"] = metrics.pop("tokens") / max(metrics["step_seconds"], 1e-9)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    acc.log(metrics, step=self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", *TERMS) if k in metrics})
                if self.val is not None and (self.step == self.total_steps
                                             or (cfg.val_every and self.step % cfg.val_every == 0)):
                    acc.log(self.validate(), step=self.step)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
            del batches
            self.epoch += 1
        if bar is not None:
            bar.close()
        self._finish()

    def _optimizer_step(self, group: list) -> dict[str, float] | None:
        acc = self.acc
        device = acc.device
        group = [(None if b is None else self.data.materialize(b), t) for b, t in group]
        # per micro-batch, summed over ranks: rows and tokens (the loss denominators), and for sharded runs the
        # ranks holding a batch, those with images, and the samples
        local = torch.tensor([[b.n_text, b.n_visual, b.n_gram, b.n_tokens, 1, b.n_visual > 0, len(b.visual_splits)]
                              if b is not None else [0] * 7 for b, _ in group], dtype=torch.float64, device=device)
        per = acc.reduce(local, reduction="sum")
        if self.sharded:
            keep = sharded_slots(per, acc.num_processes)
            for i in (i for i, k in enumerate(keep) if not k and per[i, 4] > 0):
                self.sync_dropped += int(per[i, 6])
                log.warning("stage %s: micro-batch %d dropped on every rank (%d samples, %d dropped so far): FSDP / "
                            "ZeRO-3 gather each layer's weights inside its forward, so every rank must run the same "
                            "modules, and %d of %d ranks held a micro-batch, %d of them with images (the vision "
                            "tower runs only on those)", self.plan.name, i, int(per[i, 6]), self.sync_dropped,
                            int(per[i, 4]), acc.num_processes, int(per[i, 5]))
            group = [(b if k else None, t) for (b, t), k in zip(group, keep)]
            per = per * torch.tensor(keep, dtype=per.dtype, device=device)[:, None]
        total = per[:, :4].sum(0)
        if total[3] == 0:  # every sample of every micro-batch on every rank was skipped: the same call on all ranks
            for _, tags in group:
                self.data.mark(tags)
            log.warning("stage %s: a step's micro-batches held no usable sample on any rank (all skipped); not "
                        "counted as a step", self.plan.name)
            return None
        counts = StepCounts(text=int(total[0]), visual=int(total[1]), gram=int(total[2]))
        sums = {name: 0.0 for name in TERMS}
        loss_value = 0.0
        for i, (batch, tags) in enumerate(group):
            last = i == len(group) - 1
            ctx = acc.no_sync(self.wrapped) if not last else contextlib.nullcontext()
            with ctx:
                if batch is None:  # every sample of this micro-batch was skipped: keep DDP in step with a zero loss
                    loss, parts = zero_loss(self.wrapped), {}
                else:
                    batch = batch.to(device)
                    with acc.autocast():  # chunked: hidden states at the text rows; the head runs chunk by chunk
                        rows = self.wrapped(batch.model_inputs, batch.text_rows, batch.visual_rows,
                                            logits=not self.objective.chunked)
                    loss, parts = self.objective(*rows, batch, counts, acc.num_processes)
                    if not loss.requires_grad or acc.num_processes > 1:
                        # a loss that reaches no (or not every) trainable parameter: a text-only micro-batch while
                        # only the projector trains. Every trainable parameter joins the graph with a zero, so
                        # backward runs and, under DDP, every rank's all-reduce covers the same parameters.
                        loss = loss + zero_loss(self.wrapped)
                acc.backward(loss)
            loss_value += float(loss.detach()) / acc.num_processes
            for k, v in parts.items():
                sums[k] += v
            self.data.mark(tags)
        if self.cfg.max_grad_norm:
            acc.clip_grad_norm_([p for p in self.wrapped.parameters() if p.requires_grad], self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # term means over the global step, for logging
        vec = acc.reduce(torch.tensor([sums[k] for k in TERMS] + [loss_value], dtype=torch.float64, device=device),
                         reduction="sum")
        metrics = self.objective.metrics(dict(zip(TERMS, vec[:-1].tolist())), counts)
        metrics["loss"] = float(vec[-1])
        metrics["tokens"] = float(total[3])
        metrics["text_rows"], metrics["visual_rows"] = counts.text, counts.visual
        return metrics

    def validate(self) -> dict[str, float]:
        """Teacher-forced answer NLL on --val-data (every rank scores all of it: small, and no collective); with
        --keep-best, a CPU copy of the weights when it is the lowest so far."""

        records, encoder, pad = self.val
        model = self.acc.unwrap_model(self.wrapped).model
        res = answer_nll(model, encoder, records, pad, batch_size=self.cfg.batch_size)
        if res["nll"] is None:
            raise ValueError(f"val_data {self.cfg.val_data}: no record could be scored (skipped: {res['skipped']})")
        self.val_history.append({"step": self.step, "val_nll": res["nll"], "val_tokens": res["tokens"]})
        if self.cfg.keep_best and (self.best is None or res["nll"] < self.best[0]):
            self.best = (res["nll"], self.step, {k: v.detach().to("cpu", copy=True)
                                                 for k, v in model.state_dict().items()})
        return {"val_nll": res["nll"]}

    def _finish(self) -> None:
        acc = self.acc
        acc.wait_for_everyone()
        if self.best is not None and self.best[1] != self.step:
            log.info("stage %s: keeping the weights of step %d (val NLL %.4f), not the last step's",
                     self.preset.name, self.best[1], self.best[0])
            acc.unwrap_model(self.wrapped).model.load_state_dict(self.best[2])
        if self.lora is not None:  # the stage's output is a plain model: W + (alpha / r) B A, adapters removed
            merge_lora(self.lora)
        # a collective: gathers sharded weights under FSDP / ZeRO-3, a plain state_dict otherwise
        full = acc.get_state_dict(self.wrapped)
        if acc.is_main_process:
            final = os.path.join(self.out, "final")
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model = acc.unwrap_model(self.wrapped).model
            state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            save_student(model, self.processor, tmp, state_dict=state)
            save_json(os.path.join(tmp, "kd_stage.json"), {
                "stage": self.preset.name, "steps": self.step,
                "data_stats": {**self.data.stats(), "dropped_to_keep_shards_in_step": self.sync_dropped},
                "validation": self.val_history,
                "kept_step": self.best[1] if self.best is not None else self.step,
                "lora": None if self.lora is None else {"r": self.cfg.lora_r, "alpha": self.cfg.lora_alpha,
                                                        "targets": self.cfg.lora_target_list(), "merged": True}})
            publish_folder(tmp, final)  # fsynced: a power loss cannot leave a final/ with truncated weights
        acc.wait_for_everyone()
        # the trackers end here; the process group does not (`Accelerator.end_training` would destroy it, while the
        # wrapped model still holds it, and a recipe's next stage needs it): `end_distributed` ends it after the run
        for tracker in acc.trackers:
            tracker.finish()


def shards_parameters(acc: Accelerator) -> bool:
    """FSDP or DeepSpeed ZeRO-3 over several processes: each module's weights are gathered from every rank inside
    its forward, so a module that runs on some ranks and not on others waits forever."""
    from accelerate.utils import DistributedType

    if acc.num_processes < 2:
        return False
    if acc.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return acc.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3


def sharded_slots(per: torch.Tensor, world_size: int) -> list[bool]:
    """Which micro-batches of a step a sharded run (`shards_parameters`) can train on: those every rank holds, with
    images on all of them or on none. `per` (M, 7): per micro-batch, summed over ranks, the columns of
    `StageRunner._optimizer_step` (text, visual, gram rows, tokens, ranks holding it, ranks with images, samples).
    Every rank gets the same `per`, hence the same answer: the others are skipped by all ranks alike."""
    return [bool(row[4] == world_size and row[5] in (0, world_size)) for row in per.tolist()]


DEFAULT_COLLECTIVE_TIMEOUT = 1800


def collective_timeout() -> float:
    """Seconds a rank waits in a collective before failing (`KD_DIST_TIMEOUT`, default 30 min: a checkpoint of a
    large student may keep the other ranks waiting that long)."""
    raw = os.environ.get("KD_DIST_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_COLLECTIVE_TIMEOUT
    except ValueError:
        raise ValueError(f"KD_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"KD_DIST_TIMEOUT must be > 0, got {raw!r}")
    return value


def end_distributed(finished: bool = True) -> None:
    """Tear this rank's process group down explicitly, in an order that cannot deadlock (docs/scaling.md,
    "Multi-process teardown"). A process that exits with a live gloo group can hang in the group's destructor,
    which joins a thread waiting for the GIL the destructor holds (pytorch/pytorch#56297). In order:

    1. after a failure (`finished` False, called while the error propagates), the frames of that error's
       traceback are cleared: they hold the stage's runner, whose DDP model (its Reducer) holds the group;
    2. what held the group is freed (gc: the runner, the wrapped model, optimizer and scheduler, the accelerator);
    3. only when this rank finished its run: a barrier, so no rank destroys its end of the group while a peer
       still uses it. A failed rank skips it and leaves at once, which ends its peers' collectives with an error
       (gloo: "connection closed by peer"; under torchrun the launcher also stops them); a peer that hangs instead
       fails the barrier after KD_DIST_TIMEOUT, like every collective;
    4. the group is destroyed. After a failure, an error of the teardown itself is logged, not raised: the
       failure is what this rank reports."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if not finished:
        _release_frames(sys.exc_info()[1])
    gc.collect()
    passed = False
    try:
        if finished:
            try:
                dist.barrier()
            except RuntimeError as e:  # gloo: "Connection closed by peer" / "Timed out waiting ...ms"
                raise RuntimeError(f"this rank finished, but another one failed or hung (a collective waits at most "
                                   f"KD_DIST_TIMEOUT={collective_timeout():g} s): {e}") from e
            passed = True
    finally:
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - after a failure, the failure is the error to report
            if passed:
                raise
            log.warning("destroying the process group after a failure: %s", describe(e))


def _release_frames(error: BaseException | None) -> None:
    """Clear the locals of every finished frame of `error`'s traceback, and of the errors it was raised from or
    while handling (frames still running are left as they are)."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        todo += [e.__cause__, e.__context__]


def _gather_objects(acc, obj) -> list:
    if acc.num_processes == 1:
        return [obj]

    out = [None] * acc.num_processes
    dist.all_gather_object(out, obj)
    return out
