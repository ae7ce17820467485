"""`kd train`: one stage (DPT, SFT, DFT) or a recipe of stages, on accelerate, streaming the teacher cache.

No teacher is ever loaded here: KD targets come from the cache. Each optimizer step first collects its
micro-batches, all-reduces their target-row counts, and normalises every loss term by the step-wide count, so
the gradient is the per-row mean over the global batch whatever the accumulation and the number of ranks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable

from kd_cache.config import to_dict
from kd_cache.files import save_json
from kd_cache.lock import TrainLock, is_lock_file
from kd_cache.paths import check_input_path, check_model_path, check_writable_folder
from kd_cache.reader import Cache
from kd_cache.remote import is_remote
from kd_train.config import TrainConfig
from kd_train.engine import StageRunner, end_distributed
from kd_train.plan import StagePlan, distils, plan_stage, stage_configs
from kd_train.stream import ensure_nonempty

__all__ = ["TrainConfig", "run", "preflight", "train_stage", "stage_runner", "launch_rank"]

log = logging.getLogger("kd_train")


def run(cfg: TrainConfig, report: Callable[[str, str, bool], None] | None = None) -> list[str]:
    """Run the configured stage or recipe; returns the output folders (one per stage, in order). `report(stage,
    final folder, trained)` is called as each stage ends (trained False: it had finished before).

    One trainer per output folder: every rank holds its lock on --out (kd_cache/lock.py, `.lock-r<RANK>-of-<WORLD>`)
    from before anything there is written or deleted (`--overwrite` included) until the run ends; another live
    `kd train` holding it is refused with FolderLocked (a ValueError) naming it."""
    check_writable_folder(cfg.out)  # before the lock creates the folder: a file or an unwritable parent is named
    rank, world = launch_rank()
    with TrainLock(cfg.out, rank, world):
        plans, caches = preflight(cfg)
        if cfg.recipe is not None and int(os.environ.get("RANK", "0")) == 0:  # each stage saves its own; this is
            os.makedirs(cfg.out, exist_ok=True)                                 # the command as resolved
            save_json(os.path.join(cfg.out, "train_config.json"), {"recipe": cfg.recipe, "config": to_dict(cfg)})
        outs, finished = [], False
        try:
            for preset, stage_cfg in stage_configs(cfg):
                plan = plans.get(preset.name)
                if plan is None:
                    log.info("stage %s already finished at %s", preset.name, os.path.join(stage_cfg.out, "final"))
                    outs.append(os.path.join(stage_cfg.out, "final"))
                else:
                    outs.append(train_stage(plan, caches.get(stage_cfg.cache)))
                if report is not None and int(os.environ.get("RANK", "0")) == 0:
                    report(preset.name, outs[-1], plan is not None)
            finished = True
        finally:
            end_distributed(finished)  # every stage of every rank done (or this rank failed): the group goes now
    return outs


# the variables accelerate forms its process group from, in its order (accelerate.utils.environment)
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launch_rank() -> tuple[int, int]:
    """(rank, number of ranks) of this process in its launch, read before accelerate starts: RANK / WORLD_SIZE
    (`accelerate launch`, torchrun, deepspeed) or an MPI launcher's equivalents, as accelerate reads them. Not
    SLURM_PROCID / SLURM_NTASKS, which `kd cache build` also reads: accelerate forms no process group from them, so
    the tasks of a bare `srun kd train` are separate runs, and they must exclude each other."""
    def first(names: tuple[str, ...], default: int) -> int:
        for name in names:
            raw = os.environ.get(name, "").strip()
            if raw:
                try:
                    return int(raw)
                except ValueError:
                    raise ValueError(f"{name} must be an integer, got {raw!r}") from None
        return default

    rank, world = first(RANK_VARS, 0), first(WORLD_VARS, 1)
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank} WORLD_SIZE={world}")
    return rank, world


def preflight(cfg: TrainConfig) -> tuple[dict[str, StagePlan], dict[str, Cache]]:
    """Everything about a run that can be wrong without a model, checked before any model is loaded (and before
    anything is written): the student folder, the output folder is writable, and for every stage still to run its
    data file and image folder exist, the cache it reads exists, is complete (manifest written) and holds samples,
    and its flags fit that cache (`plan_stage`). Raises FileNotFoundError / ValueError naming the stage and the path.

    Returns the plan of every stage still to run (by stage name) and the caches they read, each opened once.
    `run()` calls it with this rank's lock on --out held; `stage_runner` (benchmarks) takes no lock."""
    check_writable_folder(cfg.out)
    _same_run_or_start_over(cfg)
    stages = stage_configs(cfg)
    todo = [(p, c) for p, c in stages if not os.path.exists(os.path.join(c.out, "final", "config.json"))]
    if todo and todo[0][0] is stages[0][0]:  # later stages start from the previous stage's output
        check_model_path(cfg.student, "student")
    if todo and cfg.online_teacher is not None:
        check_model_path(cfg.online_teacher, "online teacher")
    caches: dict[str, Cache] = {}
    plans: dict[str, StagePlan] = {}
    for preset, c in todo:
        where = f" (stage {preset.name})" if cfg.recipe is not None else ""
        if c.data is not None:
            check_input_path(c.data, f"data file{where}")
        if c.images is not None:
            check_input_path(c.images, f"image folder{where}", folder=True)
        if c.val_data is not None:
            check_input_path(c.val_data, f"val data file{where}")
        if c.val_images is not None:
            check_input_path(c.val_images, f"val image folder{where}", folder=True)
        manifest = None
        if distils(c, preset) and c.online_teacher is None and c.cache is not None:
            if c.cache not in caches:
                caches[c.cache] = _open_cache(c.cache, where)
            manifest = caches[c.cache].manifest
        try:
            plans[preset.name] = plan_stage(c, preset, manifest)
        except ValueError as e:
            raise ValueError(f"stage {preset.name}: {e}" if cfg.recipe is not None else str(e)) from None
    return plans, caches


CONFIG_NAME = "train_config.json"


def _same_run_or_start_over(cfg: TrainConfig) -> None:
    """A rerun into an --out that holds a run resumes it, so it must ask for what that run was started with (else
    the saved configuration would stop describing the weights beside it); `--overwrite` deletes the earlier run
    first, but not the lock files (this run's is held: kd_cache/lock.py). ValueError naming every setting that
    differs."""
    saved_path = os.path.join(cfg.out, CONFIG_NAME)
    if cfg.overwrite:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("overwrite deletes the earlier run before the processes start training: run it in one "
                             "process (or delete the folder), then launch the processes without it")
        earlier = _run_files(cfg.out)
        if earlier:
            if not os.path.exists(saved_path):
                raise ValueError(f"overwrite: {cfg.out} holds files but no {CONFIG_NAME}: not a `kd train` output "
                                 "folder, so nothing is deleted; give another --out")
            log.warning("overwrite: deleting the earlier run in %s", cfg.out)
            for name in earlier:
                path = os.path.join(cfg.out, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        return
    if not os.path.exists(saved_path):
        return
    try:
        with open(saved_path) as f:
            saved = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{saved_path} is unreadable ({type(e).__name__}: {e}); pass --overwrite to start over "
                         "or give another --out") from None
    want = json.loads(json.dumps(to_dict(cfg), default=str))
    if not isinstance(saved, dict):
        saved = {}
    differ = [k for k in sorted(want) if k in saved and k not in TrainConfig.NON_SEMANTIC and saved[k] != want[k]]
    if differ:
        lines = "; ".join(f"--{k.replace('_', '-')}: the run has {saved[k]!r}, this command {want[k]!r}" for k in differ)
        raise ValueError(f"{cfg.out} holds a run started with other settings ({lines}); rerun with its settings to "
                         "resume it, give another --out, or pass --overwrite to start over")


def _run_files(out: str) -> list[str]:
    """What --out holds besides lock files (the lock of this run, stale ones of killed runs): what a run wrote."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if not (is_lock_file(n) and os.path.isfile(os.path.join(out, n))))


def _open_cache(cache: str, where: str = "") -> Cache:
    """The cache, opened: it exists, is complete and holds samples (its manifest is read; no shard is)."""
    if not is_remote(cache):
        if not os.path.exists(cache):
            raise FileNotFoundError(f"cache{where} {cache} does not exist; build it with `kd cache build`")
        if not os.path.isdir(cache):
            raise ValueError(f"cache{where} {cache} is a file; give the cache folder (or URL)")
    return ensure_nonempty(cache)  # FileNotFoundError while the manifest is missing (incomplete), ValueError when empty


def train_stage(plan: StagePlan, cache: Cache | None = None) -> str:
    """Train one planned stage; writes the HF-loadable student to `<out>/final` and returns that path. `cache`: the
    opened cache the stage reads (opened here when not given)."""
    if plan.done:
        log.info("stage %s already finished at %s", plan.name, plan.final)
        return plan.final
    StageRunner(plan, cache).fit()
    return plan.final


def stage_runner(cfg: TrainConfig) -> StageRunner:
    """The runner of a one-stage configuration, checked and planned as `kd train` does (benchmarks drive its steps
    directly); the stage must not be finished."""
    if cfg.stage is None:
        raise ValueError("stage_runner takes a one-stage configuration (stage set, no recipe)")
    plans, caches = preflight(cfg)
    if cfg.stage not in plans:
        raise ValueError(f"stage {cfg.stage} already finished at {os.path.join(cfg.out, 'final')}")
    return StageRunner(plans[cfg.stage], caches.get(cfg.cache))
