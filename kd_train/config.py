"""Configurations of `kd train` and `kd student compose` (torch-free: the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kd_cache.config import check_choices, option
from kd_train.stages import PRESETS, RECIPES, STAGES, StagePreset
from kd_train.tracking import check_trackers, parse_trackers

if TYPE_CHECKING:
    from kd_train.losses import KDLossConfig

SELECT_STRATEGIES = ("default", "full")  # LLaVA's vision_feature_select_strategy values


# rows of student logits per chunk of the row-chunked objective. CPU: benchmarks/chunked_loss.py, the largest size
# that kept the loss's activations <= 1/4 of the unchunked path's at no slower steps (Qwen2-0.5B head). GPU:
# benchmarks/gpu_check.py on an H200, where 96-row chunks made the DFT step 1.6x the unchunked one (many small
# kernels, a sync per chunk) and 1024 rows ran within 2 % of it at 1.7 GiB less peak memory (docs/benchmarks.md)
DEFAULT_LOSS_CHUNK_SIZE = 96
DEFAULT_LOSS_CHUNK_SIZE_GPU = 1024


def loss_chunk_size_for(value: int | None, cuda: bool) -> int:
    """The chunk size a run uses: the configured one, or when unset the default of the device it trains on."""
    if value is not None:
        return value
    return DEFAULT_LOSS_CHUNK_SIZE_GPU if cuda else DEFAULT_LOSS_CHUNK_SIZE


@dataclass
class TrainConfig:
    """Configuration of `kd train`. Unset (None) loss weights, lr and trained parts take the stage's preset."""

    student: str = option(help="Student: an HF multimodal model folder/id (e.g. from `kd student compose`), or a "
                               "causal LM for a text-only cache.")
    out: str = option(help="Output folder; a stage writes <out>/final, a recipe <out>/<stage>/final.")
    data: str | None = option(None, help="LLaVA-format data the cache was built from (SFT: the training data).")
    images: str | None = option(None, help="Image root folder of the data.")
    cache: str | None = option(None, help="Teacher cache folder or URL (DPT/DFT).")
    stage: str | None = option(None, choices=STAGES, help="Train one stage: dpt, sft or dft (or give --recipe).")
    recipe: str | None = option(None, choices=RECIPES,
                                help="llava-kd (DPT -> SFT -> DFT) or baseline (the same stages, CE only).")
    # DPT reads caption data; a recipe uses these for its DPT stage (default: the same as data/cache/images)
    dpt_data: str | None = option(None, help="Recipe only: caption data for DPT.", default_help="--data")
    dpt_images: str | None = option(None, help="Recipe only: image root of the DPT data.", default_help="--images")
    dpt_cache: str | None = option(None, help="Recipe only: the caption-data cache for DPT.", default_help="--cache")
    lr: float | None = option(None, help="Peak learning rate.", default_help="1e-3 DPT, 2e-5 SFT/DFT (stage preset)")
    # override which parts a stage trains (None: the stage's preset); e.g. a teacher trained from scratch
    train_vision: bool | None = option(None, flag="--train-vision/--freeze-vision",
                                       help="Train or freeze the vision tower.", default_help="frozen in every stage")
    train_projector: bool | None = option(None, flag="--train-projector/--freeze-projector",
                                          help="Train or freeze the projector.", default_help="trained in every stage")
    train_llm: bool | None = option(None, flag="--train-llm/--freeze-llm", help="Train or freeze the LLM.",
                                    default_help="frozen in DPT, trained in SFT/DFT")
    epochs: int = option(1, help="Epochs per stage.")
    max_steps: int | None = option(None, help="Stop each stage after this many optimizer steps.",
                                   default_help="the epochs' steps")
    batch_size: int = option(4, help="Micro-batch size per process.")
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    warmup_ratio: float = option(0.03, help="Warmup fraction of the cosine schedule.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    max_grad_norm: float | None = option(1.0, help="Gradient clipping norm (0 or none: no clipping).")
    ce_weight: float | None = option(None, help="Weight of CE.", default_help="1 in every stage")
    mdist_text_weight: float | None = option(None, help="Weight of MDist on response rows.",
                                             default_help="1 in DPT/DFT, 0 in SFT")
    mdist_visual_weight: float | None = option(None, help="Weight of MDist on visual rows.",
                                               default_help="1 in DPT/DFT, 0 in SFT")
    rdist_weight: float | None = option(None, help="Weight of RDist.", default_help="1 in DPT/DFT, 0 in SFT")
    kind: str = option("forward_kl", choices=("forward_kl", "reverse_kl", "jsd"), help="MDist divergence.")
    temperature: float = option(1.0, help="MDist temperature (the loss is scaled by T^2).")
    visual_temperature: float | None = option(None, help="MDist temperature of the visual rows.",
                                              default_help="--temperature")
    label_smoothing: float = option(0.0, help="CE label smoothing eps in [0, 1) (a regularisation control).")
    cross_tokenizer: str = option("off", choices=("off", "uld", "hybrid"),
                                  help="A student whose tokenizer differs from the teacher's: its answer tokens are "
                                       "grouped with the teacher's by the bytes they cover and the response rows "
                                       "distilled with uld (sorted-probability distance) or hybrid (--kind over the "
                                       "tokens both vocabularies share, ULD on the rest). off: the student must "
                                       "share the teacher's tokenizer.")
    teacher_tokenizer: str | None = option(None, help="With --cross-tokenizer on a cache older than format v3 (which "
                                                      "does not carry it): the teacher's tokenizer folder.")
    use_tail: bool = option(True, flag="--tail/--no-tail",
                            help="Keep the tail bucket (mass outside the top-k); --no-tail renormalises over the top-k.")
    jsd_beta: float = option(0.5, help="JSD beta.")
    max_length: int | None = option(4096, help="SFT truncation (KD stages use the cache's).")
    append_eos: bool | None = option(None, flag="--append-eos/--no-append-eos",
                                     help="Append EOS after answers when the chat template writes no end marker "
                                          "(see `kd cache build --append-eos`).",
                                     default_help="the cache's rule; on without a cache")
    val_data: str | None = option(None, help="LLaVA-format records scored during training (teacher-forced answer "
                                              "NLL, logged as val_nll); in a recipe, the SFT and DFT stages.")
    val_images: str | None = option(None, help="Image root of --val-data.", default_help="--images")
    val_every: int = option(0, help="Score --val-data every N steps (0: at the end of each stage only).")
    keep_best: bool = option(False, help="Early stopping: each stage saves the weights of its lowest val NLL, not "
                                         "its last step (needs --val-data and --val-every; not with checkpoints).")
    seed: int = option(0, help="Seed of init, shuffling and order.")
    shuffle_buffer: int = option(256, help="Samples in the streaming shuffle buffer.")
    num_workers: int = option(0, help="DataLoader workers per process.")
    checkpoint_every: int = option(0, help="Checkpoint every N steps (0: none); a rerun resumes from the latest.")
    keep_checkpoints: int = option(2, help="Checkpoints kept (older ones are deleted).")
    log_every: int = option(1, help="Log metrics every N steps.")
    mixed_precision: str = option("auto", choices=("auto", "no", "bf16", "fp16"),
                                  help="auto is bf16 on GPUs that support it, else no.")
    trackers: str = option("jsonl", help="Comma list of trackers: jsonl (<out>/metrics.jsonl) and any accelerate "
                                         "supports by name (tensorboard, wandb, mlflow, comet_ml, aim, clearml, "
                                         "dvclive, swanlab, trackio); each must be installed.")
    # memory (docs/training.md "Training on small GPUs")
    loss_chunk_size: int | None = option(None, help="Rows of student logits formed at a time for CE and MDist (0: "
                                                    f"all rows at once; unset: {DEFAULT_LOSS_CHUNK_SIZE} on CPU, "
                                                    f"{DEFAULT_LOSS_CHUNK_SIZE_GPU} on a GPU).")
    gradient_checkpointing: bool = option(False, help="Recompute the student LLM's (and a training vision tower's) "
                                                      "activations in backward instead of keeping them.")
    lora_r: int = option(0, help="LoRA rank for the student LLM in SFT/DFT (0: full fine-tuning); the projector "
                                 "trains fully, the final model has the adapters merged.")
    lora_alpha: float = option(16.0, help="LoRA alpha (the adapters' scale is alpha / r).")
    lora_targets: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                               help="Comma list of the LLM's linear layer names that get adapters.")
    lora_dropout: float = option(0.0, help="LoRA dropout.")
    skip_corrupt_shards: bool = option(False, help="Skip (and count) unreadable shards instead of stopping.")
    skip_missing_images: bool = option(False, help="Skip (and count) cached samples whose image is gone.")
    # reference mode: run this teacher every step instead of reading a cache (the paper's online way)
    online_teacher: str | None = option(None, help="Reference mode: run this teacher every step instead of "
                                                   "reading a cache.")
    online_top_k: int = option(64, help="Online mode: top-k per response row (0: the full vocabulary).")
    online_visual_top_k: int = option(64, help="Online mode: top-k per visual row (0: the full vocabulary).")
    progress: bool = option(True, flag="--progress/--quiet", help="Show progress.")
    overwrite: bool = option(False, help="Start over: delete what an earlier `kd train` wrote in --out (stages, "
                                         "checkpoints, saved configuration) first. Without it, a rerun into the same "
                                         "--out resumes that run and must use its settings.")

    # fields that change how a run is watched or stored, not what it trains: a rerun may change them and resume
    NON_SEMANTIC = ("out", "progress", "overwrite", "num_workers", "checkpoint_every", "keep_checkpoints", "log_every",
                    "trackers", "skip_corrupt_shards", "skip_missing_images")

    def __post_init__(self) -> None:
        if (self.stage is None) == (self.recipe is None):
            raise ValueError(f"give exactly one of stage ({', '.join(STAGES)}) or recipe ({', '.join(RECIPES)}), "
                             f"got stage={self.stage!r} recipe={self.recipe!r}")
        check_choices(self)
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("loss_chunk_size", "lora_r"):
            v = getattr(self, name)
            if name == "loss_chunk_size" and v is None:  # the device's default (`loss_chunk_size_for`)
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_r and not self.lora_target_list():
            raise ValueError(f"lora_targets must name at least one linear layer, got {self.lora_targets!r}")
        if self.keep_best and (self.val_data is None or not self.val_every):
            raise ValueError(f"keep_best needs val_data and val_every > 0, got val_data={self.val_data!r} "
                             f"val_every={self.val_every!r}")
        if self.keep_best and self.checkpoint_every:
            raise ValueError("keep_best keeps the best weights in memory, which checkpoints do not hold: a resumed "
                             f"stage would lose them; got checkpoint_every={self.checkpoint_every}, use 0")
        for name in ("checkpoint_every", "num_workers", "shuffle_buffer", "val_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        check_trackers(self.trackers)  # known to accelerate (or jsonl) and installed, before anything trains
        if self.data is None and self.dpt_data is None:
            raise ValueError("data is required: the LLaVA-format file the cache was built from (or SFT data)")
        for name in ("online_top_k", "online_visual_top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: full vocabulary), got {v!r}")
        if self.online_teacher is not None:
            if self.cache is not None or self.dpt_cache is not None:
                raise ValueError("give either a cache or online_teacher (the online reference), got both")
        elif self.stage in ("dpt", "dft") and self.cache is None:
            raise ValueError(f"stage {self.stage} distils from a cache; pass cache (a folder or URL)")
        if self.recipe == "llava-kd" and self.cache is None and self.dpt_cache is None and self.online_teacher is None:
            raise ValueError("recipe llava-kd needs cache (and optionally dpt_cache for caption data)")
        self.loss_config(PRESETS[self.stage or "dft"])  # validates kind/temperature/weights early

    def tracker_list(self) -> list[str]:
        return parse_trackers(self.trackers)

    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def setting(self, preset: StagePreset, name: str):
        """The stage's value of a setting the preset also defines (loss weights, lr, trained parts): the flag when
        given, else the preset's."""
        value = getattr(self, name)
        return getattr(preset, name) if value is None else value

    def loss_config(self, preset: StagePreset) -> "KDLossConfig":
        from kd_train.losses import KDLossConfig  # deferred: losses.py imports torch, the CLI starts without it

        pick = lambda name: self.setting(preset, name)  # noqa: E731
        return KDLossConfig(ce_weight=pick("ce_weight"), mdist_text_weight=pick("mdist_text_weight"),
                            mdist_visual_weight=pick("mdist_visual_weight"), rdist_weight=pick("rdist_weight"),
                            kind=self.kind, temperature=self.temperature, use_tail=self.use_tail,
                            jsd_beta=self.jsd_beta, visual_temperature=self.visual_temperature,
                            label_smoothing=self.label_smoothing)


@dataclass
class ComposeConfig:
    """Configuration of `kd student compose` (saved as compose_config.json in the student folder)."""

    out: str = option(help="Output folder (an HF LLaVA model + processor).")
    vision: str = option(help="Vision tower source: the teacher (its tower is copied) or a SigLIP/CLIP checkpoint.")
    llm: str = option(help="Base causal LLM (Qwen2, Llama/SmolLM, ...): folder or hub id.")
    processor_from: str | None = option(None, help="Take tokenizer + chat template from here (the teacher, so the "
                                                   "student reads the cache's token ids).", default_help="--llm")
    projector_hidden_act: str = option("gelu", help="Activation of the 2-layer MLP projector (a transformers "
                                                    "activation name).")
    vision_feature_layer: int = option(-1, help="Vision layer fed to the projector (LLaVA-1.5 CLIP: -2).")
    vision_feature_select_strategy: str = option("full", choices=SELECT_STRATEGIES,
                                                 help="full (SigLIP) or default (drop CLIP's CLS).")
    seed: int = option(0, help="Seed of the fresh projector.")
    dtype: str = option("float32", help="Weights dtype of the saved student.")

    def __post_init__(self) -> None:
        check_choices(self)
