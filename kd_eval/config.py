"""Configurations of `kd data synth`, `kd eval` and `kd demo` (torch-free: the CLI builds its options from them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kd_cache.config import check_choices, option
from kd_cache.paths import check_writable_folder
from kd_eval.synth import QUESTION_TYPES


@dataclass
class SynthConfig:
    """Configuration of `kd data synth` (recorded in <out>/synth.json with what was written)."""

    out: str = option(help="Output folder (LLaVA JSON files + images/).")
    n_caption: int = option(1000, help="Caption records (DPT).")
    n_train: int = option(2000, help="Instruction records, train split.")
    n_val: int = option(200, help="Instruction records, val split.")
    n_test: int = option(500, help="Instruction records, test split.")
    image_size: int = option(64, help="Image side in pixels.")
    question_types: str = option(",".join(QUESTION_TYPES), help="Comma list of question types to generate.")
    multi_turn: float = option(0.1, help="Fraction of train records with a second, text-only question.")
    seed: int = option(0, help="Seed: the same seed gives byte-identical files.")
    lmms_task: str | None = option(None, help="Also write the test split as a local lmms-eval task in this folder "
                                              "(task kd_synth: a YAML + the records saved with `datasets`, images "
                                              "embedded; run with lmms-eval --tasks kd_synth --include_path DIR).",
                                   default_help="none")

    def question_type_list(self) -> list[str]:
        return [t.strip() for t in self.question_types.split(",") if t.strip()]


@dataclass
class EvalConfig:
    """Configuration of `kd eval` (saved under "config" in the --out results file)."""

    model: str = option(help="Model to evaluate: an HF folder/id (teacher, baseline or distilled student).")
    data: str = option(help="LLaVA-format .json/.jsonl/.parquet file or a saved `datasets` folder; the last gpt "
                            "turn of each record is the reference answer.")
    images: str | None = option(None, help="Root folder that image paths in the data are relative to.")
    out: str | None = option(None, help="Write the JSON results (with this config) here.")
    batch_size: int = option(8, help="Prompts per generate call (left-padded); with --backend vllm, the sequences "
                                     "the engine runs at once.")
    max_new_tokens: int = option(32, help="Longest answer generated.")
    limit: int | None = option(None, help="Evaluate only the first N records.", default_help="all")
    device: str | None = option(None, help="cpu, cuda, cuda:N.", default_help="GPU if available, else CPU")
    dtype: str = option("auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="Weights dtype; auto is bf16 on GPU, fp32 on CPU.")
    backend: str = option("transformers", choices=("transformers", "vllm"),
                          help="Generation engine: transformers `generate`, or vLLM (batched; needs vLLM installed: "
                               "pip install 'kd-offline[vllm]').")
    progress: bool = option(True, flag="--progress/--quiet", help="Show progress.")

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("batch_size", "max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit!r}")
        if self.out is not None:  # before the evaluation runs, not after it
            check_writable_folder(os.path.dirname(os.path.abspath(self.out)), "folder of --out")


@dataclass
class DemoConfig:
    """Configuration of `kd demo` (its settings are recorded in <out>/demo.json)."""

    out: str = option("kd-demo", help="Folder for everything the demo makes; rerun into it to reuse finished steps.")
    quick: bool = option(False, flag="--quick/--full",
                         help="Smoke run (~2 min): tiny data and few steps; the numbers are not meaningful.")
    seed: int = option(0, help="Seed of the data and the teacher, and the first of the students' paired seeds.")
    seeds: int | None = option(None, help="Paired seeds of the students: per seed, baseline and llava-kd start from "
                                          "the same init and see the same data; the difference is reported with its "
                                          "95 % interval over the seeds.", default_help="5; 2 with --quick")
    jobs: int | None = option(None, help="Student runs at once, each a single-thread process.",
                              default_help="one per CPU core")
    progress: bool = option(True, flag="--progress/--quiet", help="Step messages and progress bars.")

    def __post_init__(self) -> None:
        for name in ("seeds", "jobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
