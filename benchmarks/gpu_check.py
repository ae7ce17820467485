"""The GPU check at real sizes: one command, one run (<= 8 minutes on one H200), every GPU target as a ratio
measured side by side plus absolute figures, written to `--out` as gpu_check.json and gpu_check.md.

    python3 -m benchmarks.gpu_check --out DIR            # full sizes, needs a CUDA GPU (budget 480 s)
    python3 -m benchmarks.gpu_check --smoke --out DIR    # the same code paths at tiny sizes on the CPU (< 1 min)

Run from the repository root with the root on PYTHONPATH (kd need not be installed; `kd_cli`, which is the folder
`cli/` installed under another name, is provided to the accelerate subprocesses by a shim package written into
the work folder). Nothing is downloaded: the models are built from hand-written configs with random weights.

On this workplace's device machine (`run` tool; see docs/benchmarks.md "GPU check"): the image already holds every
package the check imports (torch, transformers, accelerate, pyarrow, typer, pillow, pyyaml, tokenizers, fsspec,
safetensors, nvidia-ml-py), so nothing has to travel but the repository. `bash benchmarks/gpu_wheels.sh`
downloads into `.whl/` (git-ignored) the wheels of kd's declared dependencies that the image lacks (zstandard,
datasets, dill, multiprocess; none of them is imported by this check); carry them with `carry: [".whl"]`:

    set -o pipefail; mkdir -p $OUT/gpu; if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q \
      --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit; fi; \
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1; \
    python3 -m benchmarks.gpu_check --out $OUT/gpu 2>&1 | tee $OUT/gpu/log.txt

(`run` with timeout_s 560; expected about 4 minutes, see docs/benchmarks.md "GPU check" for the estimate.)

Models (full size):

* Teacher: the llava-1.5-7b architecture, config written by hand: CLIP ViT-L/14-336 tower (hidden 1024, 24
  layers, 16 heads, intermediate 4096, patch 14, image 336, projection 768, quick_gelu), 2-layer gelu projector,
  Llama-2-7B LM (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32,064, max positions 4096),
  image token id 32000, vision_feature_layer -2, select strategy "default": 576 visual tokens per image.
  7.06 B parameters, created directly on the GPU in bf16 (`with torch.device("cuda"): _from_config(...)`).
* Student (the paper's pairing): the teacher's tower (weights copied) + a fresh projector + a Qwen2-0.5B-sized LM
  (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, untied head) with the teacher's vocabulary
  (32,064 rows) so it reads the cache's ids. Created on the GPU in bf16 and saved once (kd's trainer loads a
  student folder, in fp32 master weights, as `kd train` does).
* Tokenizer/processor, offline: a byte-level BPE trained here on a word list, its vocabulary padded with filler
  entries to 32,000, `<image>` added at id 32000, ChatML chat template (the form kd_eval/tiny.py uses);
  CLIPImageProcessor 336/336; LlavaProcessor (patch 14, one CLS token dropped).
* Data: synthetic 336x336 images of random shapes and single-turn LLaVA-style conversations of ~150 text tokens
  (question ~30, answer ~110, template) + 576 visual tokens, ~730 tokens per sample.

The teacher is never written to disk (14 GB): the teacher "folder" holds its config and processor, and
`AutoModelForImageTextToText.from_pretrained` is patched, for that folder only, to return the model already on
the GPU. Everything else in `kd_cache.build.build()` and in the online-teacher trainer runs unchanged.

Phases (each a ratio measured in this run, plus absolute figures; a failing phase is recorded and the next runs):

1. build: `kd_cache.build.build(BuildConfig(...))` (top-64 text + visual rows, low-rank Gram, batch 16, 4 loader
   workers) vs forward-only (`model(**batch).logits`, the same batches pre-encoded by kd's Encoder, H2D copies
   included) over the same samples; 2 rounds in swapped order after a warm-up build. Reported: samples/s,
   build/forward for the whole call and for the build's loop (manifest's teacher + writer-wait + prepare
   seconds), GPU utilisation sampled during each (torch.cuda.utilization() via pynvml, else `nvidia-smi`, else
   n/a), bytes per sample / text row / visual row / Gram, the forward's achieved TFLOP/s, a build without the
   Gram (`gram=False`), and a breakdown of one batch (hidden states, row logits + top-k, Gram factors, host copies).
2. DFT vs SFT: kd_train's engine (`StageRunner._optimizer_step`: forward at the loss rows, objective, backward,
   clipping, AdamW, schedule; bf16 autocast, fp32 master weights) on the same micro-batch (batch 8), the way
   benchmarks/train_cost.py (a) measures it; step time, tokens/s, peak GPU memory (each stage in its own runner,
   peak stats reset before it is built); the DFT step again at other loss_chunk_size values.
3. DFT from the cache vs the online teacher (`TrainConfig(online_teacher=...)`, teacher in GPU memory): step
   time and peak GPU memory (the online runner holds the teacher; the offline runners run after it is freed).
4. RDist: `kd_train.losses.gram` (naive Z Zᵀ, per sample) vs `gram_from_hidden` (H WᵀW Hᵀ, WᵀW precomputed as
   `StudentGram` does for a frozen head, or formed per step for a trainable one) at V = 32,064 and 151,936,
   D = 896, Nv = 576, 8 samples per step, fp32: forward time, forward + backward time, extra peak memory.
4b. the loss of one DFT micro-batch (150 response rows, top-64; 576 visual rows, 50 sampled draws; V = 151,936,
   D = 896, bf16 autocast): all (rows, V) logits at once vs the row-chunked objective (kd_train/chunked.py) at 96,
   256 and 1024 rows, forward + backward time and extra peak memory (the chunked
   objective's goal: <= 1/4 memory at <= 1.10x time).
5. accelerate: one `kd train --stage dft --max-steps 1` per config in configs/accelerate, as
   `python -m accelerate.commands.launch --config_file <copy> --num_processes 1 --num_machines 1 -m kd_cli.main
   train ...` (the copy: num_processes 1; FSDP's wrap classes set to the student's decoder and vision layers, as
   the config's comment asks). DeepSpeed configs are skipped when deepspeed is not installed. pass/fail + the
   output's tail.

Every phase checks a total time budget (`--budget`, 480 s full) and records "skipped: time budget" rather than
overrun. The JSON and the markdown table are rewritten after every phase, so a run killed at its limit still
leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from kd_eval.tiny import chat_template

REPO = Path(__file__).resolve().parent.parent
GOALS = {"build_over_forward": 1.03, "dft_over_sft": 1.15}
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 32000
VOCAB = 32064
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
H200 = {"bf16_dense_tflops": 790.0, "hbm_tb_per_s": 4.8}
PHASES = ("build", "train", "rdist", "chunked", "accelerate")

# ChatML, the template kd_eval/tiny.py gives its tiny models: no default system prompt, "<image>\n" per image.
CHAT_TEMPLATE = chat_template(IMAGE_TOKEN)

WORDS = (
    "the a an of and to in is it that this there what which where when how many much more most some any each "
    "every all both few other another picture image photo scene view left right top bottom centre middle front "
    "back behind near far above below next beside between inside outside small large big little tall short long "
    "wide narrow red green blue yellow purple orange black white grey brown pink colour colours shape shapes "
    "circle square triangle rectangle line lines dot dots person people man woman child dog cat bird car bus "
    "tree house road street table chair window door wall floor sky water grass light shadow sign text number "
    "one two three four five six seven eight nine ten first second third last bright dark clear simple plain "
    "busy quiet open closed sitting standing walking holding looking wearing shows appears seems contains has "
    "have with without on at by from for as or but not no yes can could would should may might describe explain "
    "detail details question answer because so then also very quite rather partly mostly likely probably"
).split()


@dataclass
class Sizes:
    """Everything that differs between the full run and the smoke run."""

    vision: dict
    teacher_lm: dict
    student_lm: dict
    samples: int
    build_batch: int
    build_workers: int
    rounds: int
    question_tokens: int
    answer_tokens: int
    train_batch: int
    warmup_steps: int
    timed_steps: int
    rdist_nv: int
    rdist_d: int
    rdist_vocabs: tuple
    rdist_samples: int
    rdist_repeats: int
    chunk_rows: tuple  # (response rows, visual rows) of one DFT micro-batch's loss
    chunk_d: int
    chunk_vocab: int
    chunk_sizes: tuple  # 0: the unchunked path
    train_chunk_sizes: tuple  # the DFT step again at these loss_chunk_size values (the default's is "dft")
    accelerate_kinds: tuple
    budget: float


VISION_FULL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   patch_size=14, image_size=336, projection_dim=768)
FULL = Sizes(
    vision=VISION_FULL,
    teacher_lm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, max_position_embeddings=4096),
    student_lm=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, max_position_embeddings=32768),
    samples=320, build_batch=16, build_workers=4, rounds=2, question_tokens=30, answer_tokens=110,
    train_batch=8, warmup_steps=2, timed_steps=10,
    rdist_nv=576, rdist_d=896, rdist_vocabs=(32064, 151936), rdist_samples=8, rdist_repeats=5,
    chunk_rows=(150, 576), chunk_d=896, chunk_vocab=151936, chunk_sizes=(0, 96, 256, 1024),
    train_chunk_sizes=(0, 96, 256),
    accelerate_kinds=("MULTI_GPU", "FSDP", "DEEPSPEED"), budget=480.0,
)
SMOKE = Sizes(
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                image_size=56, projection_dim=16),
    teacher_lm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=1024),
    student_lm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=1024),
    samples=8, build_batch=4, build_workers=0, rounds=1, question_tokens=8, answer_tokens=16,
    train_batch=4, warmup_steps=1, timed_steps=2,
    rdist_nv=16, rdist_d=64, rdist_vocabs=(32064, 151936), rdist_samples=2, rdist_repeats=2,
    chunk_rows=(6, 10), chunk_d=32, chunk_vocab=512, chunk_sizes=(0, 4), train_chunk_sizes=(0,),
    accelerate_kinds=("MULTI_GPU", "FSDP"), budget=240.0,
)


# ------------------------------------------------------------------------------------------------ small helpers


def log(msg: str) -> None:
    print(f"[gpu_check {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


_T0 = time.perf_counter()


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rnd(x, n=4):
    return None if x is None else round(float(x), n)


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, need: float, reserve: float = 0.0) -> bool:
        return self.left() - reserve >= need


def is_cuda(dev) -> bool:
    return str(dev).startswith("cuda")


def sync(dev) -> None:
    import torch

    if is_cuda(dev):
        torch.cuda.synchronize()


def free_memory(dev) -> None:
    import torch

    gc.collect()
    if is_cuda(dev):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def mem_reset(dev) -> int | None:
    """Reset the peak statistics; returns the bytes allocated now (None on the CPU)."""
    import torch

    if not is_cuda(dev):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def mem_peak(dev) -> dict:
    import torch

    if not is_cuda(dev):
        return {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
    torch.cuda.synchronize()
    return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}


def timed_op(fn, dev, repeats: int, warmup: int = 1) -> tuple[float, int | None, list[float]]:
    """(median seconds, extra peak bytes above what was allocated before, all times) of `fn()`; CUDA events on
    the GPU, perf_counter on the CPU. The result of each call is dropped before the next."""
    import torch

    for _ in range(warmup):
        out = fn()
        del out
    base = mem_reset(dev)
    times = []
    for _ in range(repeats):
        if is_cuda(dev):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        del out
    extra = None if base is None else int(torch.cuda.max_memory_allocated()) - base
    return median(times), extra, times


class UtilSampler:
    """GPU utilisation sampled in a thread: torch.cuda.utilization() (pynvml), else nvidia-smi, else n/a."""

    def __init__(self, dev, period: float = 0.2):
        self.dev, self.period, self.samples = dev, period, []
        self.source = _util_source(dev)
        self._stop = threading.Event()
        self._thread = None

    def _read(self):
        if self.source == "pynvml":
            import torch

            return float(torch.cuda.utilization(torch.device(self.dev)))
        r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i",
                            str(_gpu_index(self.dev))], capture_output=True, text=True, timeout=5)
        return float(r.stdout.strip().splitlines()[0])

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001 - a failed read is a missing sample, never a failed phase
                pass
            self._stop.wait(self.period if self.source == "pynvml" else max(self.period, 0.5))

    def __enter__(self):
        if self.source != "n/a":
            self._thread = threading.Thread(target=self._loop, daemon=True, name="gpu-util")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return False

    def result(self) -> dict:
        if self.source == "n/a" or not self.samples:
            return {"mean_percent": None, "samples": 0, "source": self.source if self.samples else "n/a"}
        return {"mean_percent": round(statistics.mean(self.samples), 1), "samples": len(self.samples),
                "source": self.source}


def _gpu_index(dev) -> int:
    import torch

    d = torch.device(dev)
    return d.index if d.index is not None else torch.cuda.current_device()


def _util_source(dev) -> str:
    if not is_cuda(dev):
        return "n/a"
    import torch

    try:
        torch.cuda.utilization(torch.device(dev))
        return "pynvml"
    except Exception:  # noqa: BLE001
        pass
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            float(r.stdout.strip().splitlines()[0])
            return "nvidia-smi"
    except Exception:  # noqa: BLE001
        pass
    return "n/a"


def machine_info(dev) -> dict:
    import accelerate
    import torch
    import transformers

    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "host_cpus": os.cpu_count(), "device": str(dev), "card": "cpu", "driver": None, "gpu_memory_bytes": None}
    if is_cuda(dev):
        p = torch.cuda.get_device_properties(torch.device(dev))
        info.update(card=p.name, gpu_memory_bytes=int(p.total_memory), multiprocessors=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}")
        try:
            import pynvml

            pynvml.nvmlInit()
            v = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = v.decode() if isinstance(v, bytes) else v
        except Exception:  # noqa: BLE001
            try:
                r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=10)
                info["driver"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 else None
            except Exception:  # noqa: BLE001
                info["driver"] = None
    return info


@contextlib.contextmanager
def preloaded(folder: Path, model):
    """`AutoModelForImageTextToText.from_pretrained(folder, ...)` returns `model` (already on its device) while
    inside; every other name loads as usual. The teacher is never written to disk; kd's build and online trainer
    run unchanged around it."""
    from transformers import AutoModelForImageTextToText as auto

    own = auto.__dict__.get("from_pretrained")
    original = auto.from_pretrained
    target = os.path.realpath(str(folder))

    def from_pretrained(name, *args, **kwargs):
        if os.path.realpath(str(name)) == target:
            return model
        return original(name, *args, **kwargs)

    auto.from_pretrained = staticmethod(from_pretrained)
    try:
        yield
    finally:
        if own is None:
            del auto.from_pretrained
        else:
            auto.from_pretrained = own


# ------------------------------------------------------------------------------------------------ setup


def build_processor(image_size: int, patch_size: int):
    """Byte-level BPE trained on WORDS, vocabulary padded to 32,000 entries, `<image>` at 32000, ChatML template;
    CLIPImageProcessor at `image_size`; LlavaProcessor dropping one CLS token."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers.utils import is_torchvision_available

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) for _ in range(3000)]
    corpus += ["user", "assistant", "system", "Describe the image in detail.", "What is in the picture?"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) > IMAGE_TOKEN_ID:
        raise RuntimeError(f"unexpected trained vocabulary ({len(vocab)} entries)")
    for i in range(len(vocab), IMAGE_TOKEN_ID):  # unreachable by any merge: ids that exist but never occur in text
        vocab[f"<|kd_fill_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, extra_special_tokens=[IMAGE_TOKEN],
        model_max_length=4096, padding_side="right", clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    if hf.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_TOKEN_ID:
        raise RuntimeError(f"<image> got id {hf.convert_tokens_to_ids(IMAGE_TOKEN)}, expected {IMAGE_TOKEN_ID}")
    name = "CLIPImageProcessor"
    if not is_torchvision_available() and hasattr(transformers, name + "Pil"):
        name += "Pil"
    ip = getattr(transformers, name)(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})
    processor = transformers.LlavaProcessor(image_processor=ip, tokenizer=hf, patch_size=patch_size,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    return processor


def llava_config(sizes: Sizes, lm: str):
    """LlavaConfig of the teacher (`lm="teacher"`: Llama-2-7B-like) or the student (`"student"`: Qwen2-0.5B-like)."""
    import transformers

    v = sizes.vision
    vision = transformers.CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5, **v)
    common = dict(vocab_size=VOCAB, hidden_act="silu", tie_word_embeddings=False, bos_token_id=None, eos_token_id=0,
                  pad_token_id=0)
    if lm == "teacher":
        text = transformers.LlamaConfig(rms_norm_eps=1e-5, **common, **sizes.teacher_lm)
    else:
        text = transformers.Qwen2Config(rms_norm_eps=1e-6, **common, **sizes.student_lm)
    n_visual = (v["image_size"] // v["patch_size"]) ** 2
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                                    image_seq_length=n_visual, projector_hidden_act="gelu", vision_feature_layer=-2,
                                    vision_feature_select_strategy="default")


def new_model(config, dev, dtype, seed: int):
    """Random weights created on `dev` in `dtype` (no CPU initialisation)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(dev):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def generation_config():
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=[2, 0], pad_token_id=0, bos_token_id=None, do_sample=False)


def write_data(work: Path, sizes: Sizes, tokenizer) -> tuple[Path, Path, dict]:
    """Synthetic images (random shapes) + single-turn LLaVA conversations of about question_tokens +
    answer_tokens text tokens; returns (json, image folder, token statistics)."""
    from PIL import Image, ImageDraw

    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    side = sizes.vision["image_size"]
    records, q_lens, a_lens = [], [], []

    def text_of(rng: random.Random, target: int) -> tuple[str, int]:
        words: list[str] = []
        n = 0
        while n < target:
            words += [rng.choice(WORDS) for _ in range(4)]
            n = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])
        return " ".join(words).capitalize() + ".", n

    for i in range(sizes.samples):
        rng = random.Random(1000 + i)
        img = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(3, 7)):
            x0, y0 = rng.randrange(side), rng.randrange(side)
            x1, y1 = x0 + rng.randint(side // 10, side // 2), y0 + rng.randint(side // 10, side // 2)
            box = (x0, y0, min(side, x1), min(side, y1))
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        rel = f"{i:05d}.png"
        img.save(images / rel)
        q, nq = text_of(rng, int(sizes.question_tokens * rng.uniform(0.7, 1.3)))
        a, na = text_of(rng, int(sizes.answer_tokens * rng.uniform(0.7, 1.3)))
        q_lens.append(nq)
        a_lens.append(na)
        records.append({"id": f"gpu-check-{i:05d}", "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    path = work / "data.json"
    path.write_text(json.dumps(records))
    return path, images, {"question_tokens_mean": round(statistics.mean(q_lens), 1),
                          "answer_tokens_mean": round(statistics.mean(a_lens), 1)}


def _first_class(module, suffix: str) -> str:
    """Name of the first submodule class ending in `suffix` (the FSDP wrap unit of that part)."""
    for m in module.modules():
        if type(m).__name__.endswith(suffix):
            return type(m).__name__
    raise RuntimeError(f"no *{suffix} module in {type(module).__name__}")


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops_per_sample(model, tokens: float, visual: int) -> float:
    """Forward FLOPs of one sample: 2 x parameters used per token (decoder layers + LM head at every position) +
    causal attention 2 x layers x hidden x L per token, and the tower over its patches + CLS."""
    lm = model.model.language_model
    text_cfg = model.config.get_text_config()
    dense = count_params(lm.layers) + count_params(model.lm_head)
    attn = 2 * text_cfg.num_hidden_layers * text_cfg.hidden_size * tokens
    tower = model.model.vision_tower
    vcfg = model.config.vision_config
    patches = visual + 1
    vflops = 2 * count_params(tower) * patches + 4 * vcfg.num_hidden_layers * vcfg.hidden_size * patches * patches
    pflops = 2 * count_params(model.model.multi_modal_projector) * visual
    return float(tokens * (2 * dense + attn) + vflops + pflops)


@dataclass
class Context:
    sizes: Sizes
    smoke: bool
    dev: str
    dtype: object
    work: Path
    budget: Budget
    teacher_dir: Path = None
    student_dir: Path = None
    data: Path = None
    images: Path = None
    teacher: object = None  # the teacher model, on the device, until the training phase frees it
    cache: Path = None
    info: dict = field(default_factory=dict)


def setup(ctx: Context) -> dict:
    import torch

    s = ctx.sizes
    t0 = time.perf_counter()
    processor = build_processor(s.vision["image_size"], s.vision["patch_size"])
    tok = processor.tokenizer
    ctx.data, ctx.images, text_stats = write_data(ctx.work / "data", s, tok)
    t_data = time.perf_counter() - t0
    log(f"tokenizer ({len(tok)} tokens, <image> = {tok.convert_tokens_to_ids(IMAGE_TOKEN)}) and {s.samples} "
        f"samples written in {t_data:.1f}s")

    t0 = time.perf_counter()
    tcfg = llava_config(s, "teacher")
    ctx.teacher = new_model(tcfg, ctx.dev, ctx.dtype, seed=0)
    sync(ctx.dev)
    t_teacher = time.perf_counter() - t0
    ctx.teacher_dir = ctx.work / "teacher"  # config + processor only; weights stay on the device (see preloaded)
    tcfg.save_pretrained(ctx.teacher_dir)
    processor.save_pretrained(ctx.teacher_dir)
    generation_config().save_pretrained(ctx.teacher_dir)
    log(f"teacher: {count_params(ctx.teacher) / 1e9:.2f} B parameters created on {ctx.dev} in "
        f"{str(ctx.dtype).replace('torch.', '')} in {t_teacher:.1f}s")

    t0 = time.perf_counter()
    scfg = llava_config(s, "student")
    student = new_model(scfg, ctx.dev, ctx.dtype, seed=1)
    with torch.no_grad():  # the paper's pairing: the teacher's tower, a fresh projector, a small LM
        student.model.vision_tower.load_state_dict(ctx.teacher.model.vision_tower.state_dict())
    student.generation_config = generation_config()
    ctx.student_dir = ctx.work / "student"
    student.save_pretrained(ctx.student_dir)
    processor.save_pretrained(ctx.student_dir)
    layers = {"llm": _first_class(student.model.language_model, "DecoderLayer"),
              "vision": _first_class(student.model.vision_tower, "EncoderLayer")}
    sp = {"total": count_params(student), "vision": count_params(student.model.vision_tower),
          "projector": count_params(student.model.multi_modal_projector)}
    del student
    free_memory(ctx.dev)
    t_student = time.perf_counter() - t0
    log(f"student: {sp['total'] / 1e9:.3f} B parameters ({sp['vision'] / 1e6:.0f} M of them the tower), saved "
        f"in {t_student:.1f}s")
    visual = (s.vision["image_size"] // s.vision["patch_size"]) ** 2
    ctx.info["layer_classes"] = layers
    return {"seconds": {"tokenizer_and_data": round(t_data, 2), "teacher_init": round(t_teacher, 2),
                        "student_init_and_save": round(t_student, 2)},
            "teacher_parameters": count_params(ctx.teacher),
            "teacher_tower_parameters": count_params(ctx.teacher.model.vision_tower),
            "student_parameters": sp, "vocab_rows": VOCAB, "tokenizer_tokens": len(tok),
            "visual_tokens_per_image": visual, "data": {"samples": s.samples, **text_stats},
            "layer_classes": layers}


# ------------------------------------------------------------------------------------------------ phase 1: build


def phase_build(ctx: Context) -> dict:
    import numpy as np
    import torch

    from kd_cache.build import BuildConfig, build
    from kd_cache.data import Encoder, RecordSource
    from kd_cache.targets import TargetOptions, gram_factors, row_targets, to_host
    from kd_cache.teacher import Teacher
    from kd_cache.hf import collate
    from kd_cache.verify import info as cache_info

    s, dev, bs = ctx.sizes, ctx.dev, ctx.sizes.build_batch
    with preloaded(ctx.teacher_dir, ctx.teacher):
        teacher = Teacher(str(ctx.teacher_dir))  # the build's own object: processor, image token, dtype, device
    model = teacher.model
    encoder = Encoder(teacher.processor, teacher.image_token_id, image_root=str(ctx.images), max_length=4096,
                      max_images=1, append_eos=True)
    records = RecordSource(str(ctx.data))
    t0 = time.perf_counter()
    samples = [encoder.encode(records[i], i) for i in range(len(records))]
    encode_s = time.perf_counter() - t0
    batches = [collate(samples[i: i + bs], teacher.pad_id) for i in range(0, len(samples), bs)]
    tokens = int(sum(len(x.input_ids) for x in samples))
    stats = {"samples": len(samples), "tokens": tokens, "tokens_per_sample": round(tokens / len(samples), 1),
             "visual_rows": int(sum(len(x.visual_positions) for x in samples)),
             "text_rows": int(sum(len(x.text_positions) for x in samples)),
             "padded_tokens": int(sum(b["input_ids"].numel() for b in batches)), "batches": len(batches),
             "serial_encode_seconds": round(encode_s, 2)}
    flops = forward_flops_per_sample(model, stats["tokens_per_sample"], int(np.mean([len(x.visual_positions)
                                                                                        for x in samples])))
    log(f"build: {len(samples)} samples, {stats['tokens_per_sample']} tokens each "
        f"({stats['visual_rows'] // len(samples)} visual), encoded in {encode_s:.1f}s; teacher forward "
        f"{flops / 1e12:.2f} TFLOP per sample")

    def forward_only():
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                b = {k: v.to(dev) for k, v in b.items()}
                b["pixel_values"] = b["pixel_values"].to(teacher.dtype)
                model(**b).logits
        sync(dev)
        return time.perf_counter() - t0

    def run_build(name: str, data: Path, **kw) -> dict:
        out = ctx.work / name
        shutil.rmtree(out, ignore_errors=True)
        cfg = BuildConfig(teacher=str(ctx.teacher_dir), data=str(data), images=str(ctx.images), out=str(out),
                          batch_size=bs, num_workers=s.build_workers, progress=False, shard_size=256, **kw)
        with preloaded(ctx.teacher_dir, ctx.teacher):
            sync(dev)
            t0 = time.perf_counter()
            manifest = build(cfg)
            sync(dev)
            wall = time.perf_counter() - t0
        r = manifest["build"]["ranks"][0]
        loop = r["prepare_seconds"] + r["teacher_seconds"] + r["writer_wait_seconds"]
        return {"folder": str(out), "wall_seconds": round(wall, 3), "loop_seconds": round(loop, 3),
                "samples": manifest["num_samples"], "skipped": manifest["skipped"]["total"],
                **{k: r[k] for k in ("load_seconds", "prepare_seconds", "teacher_seconds", "writer_wait_seconds",
                                     "writer_encode_seconds")}}

    # warm-up: kernels, cuBLAS / cuSOLVER handles, allocator; the real path on the first batch's records
    warm = ctx.work / "data-warm.json"
    warm.write_text(json.dumps([records[i] for i in range(min(bs, len(records)))]))
    t0 = time.perf_counter()
    b0 = {k: v.to(dev) for k, v in batches[0].items()}
    b0["pixel_values"] = b0["pixel_values"].to(teacher.dtype)
    with torch.no_grad():
        model(**b0).logits
    del b0
    run_build("cache-warm", warm)
    shutil.rmtree(ctx.work / "cache-warm", ignore_errors=True)
    warm_s = time.perf_counter() - t0
    log(f"build: warm-up {warm_s:.1f}s")

    rounds = []
    reserve = 0.0 if ctx.smoke else 150.0  # the later phases' share of the budget
    for r in range(s.rounds):
        order = ["forward", "build"] if r % 2 == 0 else ["build", "forward"]
        rd = {"order": order}
        if r and not ctx.budget.allows(2.5 * rounds[-1]["forward_seconds"] + rounds[-1]["build"]["wall_seconds"],
                                       reserve):
            log(f"build: round {r} skipped (time budget)")
            break
        for what in order:
            with UtilSampler(dev) as u:
                if what == "forward":
                    rd["forward_seconds"] = round(forward_only(), 3)
                else:
                    rd["build"] = run_build(f"cache-{r}", ctx.data)
            rd[f"{what}_gpu_util"] = u.result()
        b, f = rd["build"], rd["forward_seconds"]
        rd["build_over_forward"] = round(b["wall_seconds"] / f, 4)
        rd["build_loop_over_forward"] = round(b["loop_seconds"] / f, 4)
        rd["teacher_over_forward"] = round(b["teacher_seconds"] / f, 4)
        rounds.append(rd)
        log(f"build round {r}: forward-only {f:.2f}s ({len(samples) / f:.1f} samples/s, GPU util "
            f"{rd['forward_gpu_util']['mean_percent']}%), build {b['wall_seconds']:.2f}s "
            f"(loop {b['loop_seconds']:.2f}s, teacher {b['teacher_seconds']:.2f}s, prepare "
            f"{b['prepare_seconds']:.2f}s, writer wait "
            f"{b['writer_wait_seconds']:.2f}s; GPU util {rd['build_gpu_util']['mean_percent']}%): build/forward "
            f"{rd['build_over_forward']:.3f} (loop only {rd['build_loop_over_forward']:.3f})")
        if r < s.rounds - 1:
            shutil.rmtree(ctx.work / f"cache-{r}", ignore_errors=True)
    last = rounds[-1]["build"]
    ctx.cache = Path(last["folder"])
    ci = cache_info(str(ctx.cache))
    fwd = median([rd["forward_seconds"] for rd in rounds])
    res = {"data": stats, "forward_flops_per_sample": flops, "warmup_seconds": round(warm_s, 2), "rounds": rounds,
           "build_workers": s.build_workers, "batch_size": bs,
           "forward_seconds": fwd, "build_wall_seconds": median([rd["build"]["wall_seconds"] for rd in rounds]),
           "build_over_forward": median([rd["build_over_forward"] for rd in rounds]),
           "build_loop_over_forward": median([rd["build_loop_over_forward"] for rd in rounds]),
           "goal_build_over_forward": GOALS["build_over_forward"],
           "forward_samples_per_second": round(len(samples) / fwd, 3),
           "forward_tflops_per_second": round(flops * len(samples) / fwd / 1e12, 2),
           "cache": {k: ci[k] for k in ("samples", "total_bytes", "bytes_per_text_row", "bytes_per_visual_row",
                                        "bytes_per_gram", "bytes_per_sample_common", "text_rows", "visual_rows",
                                        "gram_samples", "k")},
           "forward_gpu_util_percent": median([rd["forward_gpu_util"]["mean_percent"] for rd in rounds]),
           "build_gpu_util_percent": median([rd["build_gpu_util"]["mean_percent"] for rd in rounds]),
           "gpu_util_source": rounds[0]["build_gpu_util"]["source"]}
    res["build_samples_per_second"] = round(len(samples) / res["build_wall_seconds"], 3)
    res["bytes_per_sample"] = round(ci["total_bytes"] / max(ci["samples"], 1), 1)
    if is_cuda(dev):
        res["forward_mfu"] = round(res["forward_tflops_per_second"] / H200["bf16_dense_tflops"], 3)

    # a build without the Gram: what the RDist target costs
    if ctx.budget.allows(1.5 * res["build_wall_seconds"], reserve):
        with UtilSampler(dev) as u:
            ng = run_build("cache-nogram", ctx.data, gram=False)
        ng["gpu_util"] = u.result()
        ng["over_forward"] = round(ng["wall_seconds"] / fwd, 4)
        ng["loop_over_forward"] = round(ng["loop_seconds"] / fwd, 4)
        ng["bytes_per_sample"] = round(cache_info(ng["folder"])["total_bytes"] / max(ng["samples"], 1), 1)
        shutil.rmtree(ng["folder"], ignore_errors=True)
        res["no_gram"] = ng
        log(f"build without the Gram: {ng['wall_seconds']:.2f}s, /forward {ng['over_forward']:.3f}, "
            f"{ng['bytes_per_sample']:.0f} B/sample")
    else:
        res["no_gram"] = {"status": "skipped: time budget"}

    # where one batch's build time goes: hidden states, row logits + top-k, Gram factors, host copies
    opts = TargetOptions(text_kind="topk", text_k=64, visual_kind="topk", visual_k=64,
                         vocab_size=teacher.vocab_size)
    group = list(enumerate(samples[:bs]))
    steps: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(2):  # the second pass is the one kept (the first warms up)
            batch = {k: v.to(dev) for k, v in collate([x for _, x in group], teacher.pad_id).items()}
            batch["pixel_values"] = batch["pixel_values"].to(teacher.dtype)
            sync(dev)
            t0 = time.perf_counter()
            hidden, head = teacher.hidden_and_head(batch)
            sync(dev)
            t1 = time.perf_counter()
            rows = []
            for b, (_, x) in enumerate(group):
                zt = teacher.row_logits(hidden[b], head, torch.as_tensor(x.text_positions, device=dev))
                zv = teacher.row_logits(hidden[b], head, torch.as_tensor(x.visual_positions, device=dev))
                rows.append((zv, row_targets(zt, "topk", opts.text_k, 0, None),
                             row_targets(zv, "topk", opts.visual_k, 0, None)))
            sync(dev)
            t2 = time.perf_counter()
            grams = [gram_factors(zv, tolerance=opts.gram_tolerance, lowrank=True) for zv, _, _ in rows]
            sync(dev)
            t3 = time.perf_counter()
            for (_, tt, vt), g in zip(rows, grams):
                to_host(tt), to_host(vt), to_host(g)
            t4 = time.perf_counter()
            steps = {"hidden_states": t1 - t0, "row_logits_and_topk": t2 - t1, "gram_factors": t3 - t2,
                     "host_copies": t4 - t3}
    res["one_batch_breakdown_seconds"] = {k: round(v, 4) for k, v in steps.items()}
    res["one_batch_breakdown_seconds"]["samples"] = len(group)
    res["gram_dense_fallbacks_in_batch"] = int(sum(g.dense is not None for g in grams))
    res["gram_ranks_in_batch"] = [g.rank for g in grams]
    n_dense = res["gram_dense_fallbacks_in_batch"]
    hidden = head = rows = grams = batch = teacher = model = None  # noqa: F841 - released before the next phase
    free_memory(dev)
    log(f"build: one batch of {len(group)}: hidden states {steps['hidden_states']:.3f}s, row logits + top-k "
        f"{steps['row_logits_and_topk']:.3f}s, Gram factors {steps['gram_factors']:.3f}s "
        f"({n_dense} dense fallbacks), host copies {steps['host_copies']:.3f}s")
    return res


# ------------------------------------------------------------------------------------------------ phases 2+3: train


def phase_train(ctx: Context) -> dict:
    from kd_cache import open_cache
    from kd_train.batch import make_batch, training_example
    from kd_train.sources import cache_target_layout
    from kd_train.train import TrainConfig, stage_runner

    s, dev = ctx.sizes, ctx.dev
    if ctx.cache is None:
        raise RuntimeError("no cache: the build phase did not complete")
    common = dict(student=str(ctx.student_dir), data=str(ctx.data), images=str(ctx.images), batch_size=s.train_batch,
                  progress=False, shuffle_buffer=16, max_steps=1000)
    res: dict = {"batch_size": s.train_batch, "warmup_steps": s.warmup_steps, "timed_steps": s.timed_steps}

    def steps_of(runner, group) -> list[float]:
        for _ in range(s.warmup_steps):
            runner._optimizer_step(group)
        sync(dev)
        out = []
        for _ in range(s.timed_steps):
            t0 = time.perf_counter()
            runner._optimizer_step(group)
            sync(dev)
            out.append(time.perf_counter() - t0)
        return out

    def summary(name, times, base, n_tokens, t_build, runner) -> dict:
        m = mem_peak(dev)
        d = {"step_seconds": [round(t, 4) for t in times], "median_step_seconds": median(times),
             "tokens_per_second": round(n_tokens / median(times), 1), "runner_build_seconds": round(t_build, 2),
             "allocated_before_bytes": base, **m}
        d["trainable_parameters"] = sum(p.numel() for p in runner.model.parameters() if p.requires_grad)
        gb = (m["peak_allocated_bytes"] or 0) / 2**30
        log(f"train {name}: median step {d['median_step_seconds']:.4f}s, {d['tokens_per_second']:.0f} tokens/s, "
            f"peak {gb:.2f} GiB allocated")
        return d

    # ---- (3) online teacher first, while the teacher is in memory: its runner holds teacher + student
    free_memory(dev)
    base = mem_reset(dev)
    t0 = time.perf_counter()
    out = ctx.work / "train-online"
    with preloaded(ctx.teacher_dir, ctx.teacher):
        runner = stage_runner(TrainConfig(out=str(out), stage="dft", online_teacher=str(ctx.teacher_dir), **common))
    t_build = time.perf_counter() - t0
    runner.data.mark = lambda tags: None  # the same micro-batch is reused: keep the data state out of it
    items, otags = next(iter(runner.data.loader(0)))
    tok = getattr(runner.processor, "tokenizer", runner.processor)
    want = {it["encoded"].sample_id for it in items}
    opened = open_cache(str(ctx.cache))
    cached, layout = {x["sample_id"]: x for x in opened if x["sample_id"] in want}, cache_target_layout(opened)
    batch = make_batch([training_example(it["encoded"], cached[it["encoded"].sample_id], layout) for it in items],
                       tok.pad_token_id)
    res["batch"] = {"samples": len(items), "tokens": batch.n_tokens, "text_rows": batch.n_text,
                    "visual_rows": batch.n_visual, "gram_samples": batch.n_gram}
    teacher_bytes = sum(p.numel() * p.element_size() for p in ctx.teacher.parameters())
    res["online"] = summary("online", steps_of(runner, [(items, otags)]), base, batch.n_tokens, t_build, runner)
    res["online"]["teacher_weight_bytes"] = teacher_bytes
    del runner
    # the teacher leaves the device for good here: the offline runners see only what they need
    ctx.teacher = None
    free_memory(dev)

    groups = {"sft": [(dataclasses.replace(batch, text_targets=None, visual_targets=None, grams=None),
                       {"n": len(items), "skipped": 0})],
              "dft": [(batch, {})]}
    # the DFT step at other loss_chunk_size values ("dft": the device's default, kd_train.config.loss_chunk_size_for)
    variants = [("sft", dict(stage="sft"), "sft"), ("dft", dict(stage="dft", cache=str(ctx.cache)), "dft")]
    variants += [(f"dft_chunk{c}", dict(stage="dft", cache=str(ctx.cache), loss_chunk_size=c), "dft")
                 for c in s.train_chunk_sizes]
    for name, kw, group in variants:
        free_memory(dev)
        base = mem_reset(dev)
        t0 = time.perf_counter()
        out = ctx.work / f"train-{name}"
        runner = stage_runner(TrainConfig(out=str(out), **kw, **common))
        t_build = time.perf_counter() - t0
        runner.data.mark = lambda tags: None
        res[name] = summary(name, steps_of(runner, groups[group]), base, batch.n_tokens, t_build, runner)
        res[name]["loss_chunk_size"] = runner.plan.chunk_size
        del runner
        free_memory(dev)
    sft, dft, onl = (res[k]["median_step_seconds"] for k in ("sft", "dft", "online"))
    res["dft_over_sft"] = round(dft / sft, 4)
    res["goal_dft_over_sft"] = GOALS["dft_over_sft"]
    res["online_over_dft"] = round(onl / dft, 4)
    res["dft_over_sft_by_chunk"] = {str(res[n]["loss_chunk_size"]): round(res[n]["median_step_seconds"] / sft, 4)
                                    for n, _, g in variants if g == "dft"}
    if is_cuda(dev):
        res["dft_peak_over_sft_peak"] = round(res["dft"]["peak_allocated_bytes"]
                                              / res["sft"]["peak_allocated_bytes"], 4)
        res["offline_peak_over_online_peak"] = round(res["dft"]["peak_allocated_bytes"]
                                                     / res["online"]["peak_allocated_bytes"], 4)
    return res


# ------------------------------------------------------------------------------------------------ phase 4: RDist


def phase_rdist(ctx: Context) -> dict:
    import torch

    from kd_train.losses import gram, gram_from_hidden, rdist_loss

    s, dev = ctx.sizes, ctx.dev
    nv, d, n = s.rdist_nv, s.rdist_d, s.rdist_samples
    ctx.teacher = None  # normally freed by the training phase already
    free_memory(dev)
    out = {"nv": nv, "d": d, "samples_per_step": n, "dtype": "float32",
           "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if is_cuda(dev) else None, "vocabs": []}
    for vocab in s.rdist_vocabs:
        g = torch.Generator(device=dev).manual_seed(0)
        w = torch.randn(vocab, d, device=dev, generator=g) * d ** -0.5
        h = torch.randn(n * nv, d, device=dev, generator=g)
        hs = list(torch.split(h, nv))
        row = {"V": vocab}
        with torch.no_grad():
            row["form_z_seconds"], row["form_z_extra_bytes"], _ = timed_op(lambda: h @ w.T, dev, s.rdist_repeats)
            z = h @ w.T
            zs = list(torch.split(z, nv))
            row["naive_seconds"], row["naive_extra_bytes"], _ = timed_op(lambda: [gram(x) for x in zs], dev,
                                                                         s.rdist_repeats)
            row["wtw_seconds"], row["wtw_extra_bytes"], _ = timed_op(lambda: w.T @ w, dev, s.rdist_repeats)
            wtw = w.T @ w
            row["cheap_precomputed_seconds"], row["cheap_precomputed_extra_bytes"], _ = timed_op(
                lambda: [gram_from_hidden(x, w, wtw) for x in hs], dev, s.rdist_repeats)
            r_naive = [gram(x) for x in zs]
            r_cheap = [gram_from_hidden(x, w, wtw) for x in hs]
            row["rel_err"] = max(float((a - b).norm() / b.norm()) for a, b in zip(r_cheap, r_naive))
            targets = [x + 0.01 * x.abs().mean() * torch.randn_like(x) for x in r_naive]
            del r_naive, r_cheap
        row["cheap_per_step_seconds"] = row["cheap_precomputed_seconds"] + row["wtw_seconds"]

        # forward + backward of the Gram part (the real loss, rdist_loss), per step of n samples
        def naive_fb():
            zq = z.detach().requires_grad_(True)
            loss = sum(rdist_loss(gram(x), t, is_gram=True) for x, t in zip(torch.split(zq, nv), targets))
            loss.backward()
            return zq.grad

        def cheap_fb():  # trainable head: W^T W formed in the graph, gradients reach H and W
            hq, wq = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
            wtw_q = wq.T @ wq
            loss = sum(rdist_loss(gram_from_hidden(x, wq, wtw_q), t, is_gram=True)
                       for x, t in zip(torch.split(hq, nv), targets))
            loss.backward()
            return hq.grad, wq.grad

        row["naive_fwd_bwd_seconds"], row["naive_fwd_bwd_extra_bytes"], _ = timed_op(naive_fb, dev, s.rdist_repeats)
        row["cheap_fwd_bwd_seconds"], row["cheap_fwd_bwd_extra_bytes"], _ = timed_op(cheap_fb, dev, s.rdist_repeats)
        row["speedup_precomputed"] = row["naive_seconds"] / row["cheap_precomputed_seconds"]
        row["speedup_per_step"] = row["naive_seconds"] / row["cheap_per_step_seconds"]
        row["speedup_fwd_bwd"] = row["naive_fwd_bwd_seconds"] / row["cheap_fwd_bwd_seconds"]
        out["vocabs"].append({k: (rnd(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
        log(f"rdist V={vocab}: Z Z^T {row['naive_seconds'] * 1e3:.2f} ms, H WtW H^T "
            f"{row['cheap_precomputed_seconds'] * 1e3:.3f} ms (x{row['speedup_precomputed']:.1f}; with WtW per step "
            f"x{row['speedup_per_step']:.2f}); fwd+bwd "
            f"{row['naive_fwd_bwd_seconds'] * 1e3:.2f} vs {row['cheap_fwd_bwd_seconds'] * 1e3:.2f} ms; rel err "
            f"{row['rel_err']:.1e}")
        w = h = hs = z = zs = wtw = targets = None  # noqa: F841 - released before the next vocabulary
        free_memory(dev)
    return out


def phase_chunked(ctx: Context) -> dict:
    """One DFT micro-batch's CE + MDist (top-64 response rows, sampled visual rows) on the student's head: the
    unchunked path (all (rows, V) logits at once) vs kd_train/chunked.py, forward + backward, time and extra peak
    memory, bf16 autocast on the GPU (fp32 on the CPU)."""
    import torch

    from kd_cache.codec import SampledRows, TopKRows
    from kd_cache.targets import sampled_targets, topk_targets
    from kd_train.chunked import chunked_row_loss, concat_row_fns
    from kd_train.losses import KDLossConfig
    from kd_train.objective import text_rows_fn, visual_rows_fn

    s, dev = ctx.sizes, ctx.dev
    nt, nv = s.chunk_rows
    g = torch.Generator(device=dev).manual_seed(0)
    head = torch.nn.Linear(s.chunk_d, s.chunk_vocab, bias=False, device=dev)
    hidden = torch.randn(nt + nv, s.chunk_d, device=dev, generator=g)
    with torch.no_grad():  # teacher targets from a perturbed head: realistic, peaky-enough rows
        zt = (hidden[:nt] @ head.weight.T) * 4
        tt = topk_targets(zt, 64)
        vt = sampled_targets(hidden[nt:] @ head.weight.T, 50, generator=g)
        labels = zt.argmax(-1)
        del zt
    text = TopKRows(tt.topk_ids, tt.topk_logprobs, tt.tail_logprob, None)
    visual = SampledRows(vt.ids, vt.counts, vt.row_lengths, 50)
    cfg = KDLossConfig(ce_weight=1.0, mdist_text_weight=1.0, mdist_visual_weight=1.0, rdist_weight=0.0)
    scales = {"ce": 1.0 / nt, "mdist_text": 1.0 / nt, "mdist_visual": 1.0 / nv, "rdist": 0.0}
    fn = concat_row_fns(text_rows_fn(labels, text, cfg, scales), visual_rows_fn(nv, visual, cfg, scales))
    amp = torch.bfloat16 if is_cuda(dev) else None
    out = {"rows": nt + nv, "V": s.chunk_vocab, "D": s.chunk_d, "dtype": "bf16 autocast" if amp else "float32",
           "runs": []}
    for chunk in s.chunk_sizes:
        def step():
            h = hidden.detach().requires_grad_(True)
            head.weight.grad = None
            if chunk:
                loss, _ = chunked_row_loss(h, head, fn, chunk_size=chunk, amp_dtype=amp)
            else:
                with torch.autocast(torch.device(dev).type, dtype=amp, enabled=amp is not None):
                    z = head(h)
                loss, _ = fn(z.float(), 0, nt + nv)
            loss.backward()
            return float(loss.detach())

        seconds, extra, _ = timed_op(step, dev, 3)
        out["runs"].append({"chunk": chunk, "seconds": rnd(seconds, 6), "extra_bytes": extra, "loss": step()})
        log(f"chunked loss: chunk {chunk or 'none'}: {seconds * 1e3:.1f} ms, extra peak "
            f"{'n/a' if extra is None else f'{extra / 2**30:.2f} GiB'}")
    return out


# ------------------------------------------------------------------------------------------------ phase 5: accelerate


STATE_MARK = "KD_GPU_CHECK_STATE"
PROBE = f'''"""Generated by benchmarks/gpu_check.py: runs `kd_cli.main` as __main__ (what `-m kd_cli.main` runs) and, at
exit, prints the accelerate state the run had, so the check sees whether FSDP / DeepSpeed really took effect."""
import atexit
import json
import runpy


def _report():
    try:
        from accelerate.state import AcceleratorState, PartialState

        p, a = dict(PartialState._shared_state), dict(AcceleratorState._shared_state)
        fsdp = a.get("fsdp_plugin")
        print("{STATE_MARK}", json.dumps({{
            "distributed_type": str(a.get("distributed_type", p.get("distributed_type"))),
            "num_processes": p.get("num_processes"), "backend": p.get("backend"), "device": str(p.get("device")),
            "mixed_precision": str(a.get("_mixed_precision")), "fsdp_plugin": fsdp is not None,
            "fsdp_version": getattr(fsdp, "fsdp_version", None),
            "deepspeed_plugin": bool(a.get("deepspeed_plugins"))}}), flush=True)
    except Exception as e:  # noqa: BLE001
        print("{STATE_MARK}", json.dumps({{"error": repr(e)}}), flush=True)


atexit.register(_report)
runpy.run_module("kd_cli.main", run_name="__main__", alter_sys=True)
'''


def _kd_cli_shim(work: Path) -> Path:
    """A folder holding a `kd_cli` package whose __path__ is the repository's `cli/` (kd installs that folder
    under this name; on a machine where kd is not installed, `-m kd_cli.main` needs this), and the probe module
    `kd_gpu_check_probe` (runs kd_cli.main, reports accelerate's state at exit)."""
    shim = work / "shim"
    pkg = shim / "kd_cli"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        f"# generated by benchmarks/gpu_check.py: the repository's cli/ under its installed name\n"
        f"__path__ = [{str(REPO / 'cli')!r}]\n")
    (shim / "kd_gpu_check_probe.py").write_text(PROBE)
    return shim


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def phase_accelerate(ctx: Context) -> dict:
    import yaml

    s = ctx.sizes
    if ctx.cache is None:
        raise RuntimeError("no cache: the build phase did not complete")
    ctx.teacher = None  # the subprocesses need the device's memory
    free_memory(ctx.dev)
    shim = _kd_cli_shim(ctx.work)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               PYTHONUNBUFFERED="1")
    if ctx.smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    runs = []
    for path in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        conf = yaml.safe_load(path.read_text())
        kind = str(conf.get("distributed_type"))
        rec = {"config": str(path.relative_to(REPO)), "distributed_type": kind}
        runs.append(rec)
        if kind not in s.accelerate_kinds:
            rec["status"] = f"skipped: {'the smoke run does not launch' if ctx.smoke else 'not checked:'} {kind}"
            continue
        if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
            rec["status"] = "skipped: deepspeed not installed"
            continue
        if not ctx.budget.allows(60 if not ctx.smoke else 20):
            rec["status"] = "skipped: time budget"
            continue
        adjusted = dict(conf, num_processes=1, num_machines=1)
        changes = ["num_processes 1", "num_machines 1"]
        if kind == "FSDP":
            wrap = ",".join([ctx.info["layer_classes"]["llm"], ctx.info["layer_classes"]["vision"]])
            adjusted["fsdp_config"] = dict(conf.get("fsdp_config") or {}, fsdp_transformer_layer_cls_to_wrap=wrap)
            changes.append(f"fsdp_transformer_layer_cls_to_wrap {wrap}")
        rec["adjusted"] = changes
        cfg_path = ctx.work / "accelerate" / path.name
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(adjusted, sort_keys=False))
        out = ctx.work / f"accelerate-{path.stem}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg_path),
               "--num_processes", "1", "--num_machines", "1", "--main_process_port", str(_free_port()),
               "-m", "kd_gpu_check_probe", "train", "--stage", "dft", "--student", str(ctx.student_dir),
               "--cache", str(ctx.cache), "--data",
               str(ctx.data), "--images", str(ctx.images), "--out", str(out), "--max-steps", "1", "--batch-size",
               str(s.train_batch), "--quiet"]
        rec["command"] = " ".join(cmd[1:])
        timeout = max(30.0, min(300.0, ctx.budget.left() - 10))
        t0 = time.perf_counter()
        log(f"accelerate {path.name}: launching (timeout {timeout:.0f}s)")
        try:
            r = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
            rc, text = r.returncode, (r.stdout or "") + (r.stderr or "")
        except subprocess.TimeoutExpired as e:
            rc = None
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        rec["returncode"] = rc
        steps = []
        metrics = out / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                d = json.loads(line)
                if d.get("step") is not None and "step_seconds" in d:
                    steps.append(d)
        state = [ln.split(STATE_MARK, 1)[1].strip() for ln in text.splitlines() if STATE_MARK in ln]
        try:
            rec["accelerate_state"] = json.loads(state[-1]) if state else None
        except json.JSONDecodeError:
            rec["accelerate_state"] = {"unparsed": state[-1][:300]}
        final_ok = (out / "final" / "config.json").exists()
        ok = rc == 0 and len(steps) >= 1 and final_ok
        rec["status"] = "pass" if ok else ("fail: timeout" if rc is None else "fail")
        ran = str((rec["accelerate_state"] or {}).get("distributed_type", "")).replace("DistributedType.", "")
        want = {"MULTI_GPU": "MULTI_GPU", "FSDP": "FSDP", "DEEPSPEED": "DEEPSPEED"}.get(kind)
        if ok and is_cuda(ctx.dev) and want and ran != want:  # on a GPU the config must take effect, not fall back
            rec["status"] = f"fail: ran as {ran or 'unknown'}, not {want}"
        elif ok and not is_cuda(ctx.dev):
            rec["note"] = f"GPU-less host: accelerate ran this config as {ran or 'unknown'} (no sharding here)"
        rec["step_seconds"] = steps[-1]["step_seconds"] if steps else None
        rec["loss"] = steps[-1].get("loss") if steps else None
        rec["final_written"] = final_ok
        rec["tail"] = text[-3000:]
        log(f"accelerate {path.name}: {rec['status']} in {rec['seconds']}s"
            + ("" if ok else "\n" + "\n".join(text.strip().splitlines()[-8:])))
        shutil.rmtree(out, ignore_errors=True)
    return {"runs": runs, "passed": sum(r["status"] == "pass" for r in runs),
            "failed": sum(r["status"].startswith("fail") for r in runs),
            "skipped": sum(r["status"].startswith("skipped") for r in runs)}


# ------------------------------------------------------------------------------------------------ report


def _gib(x):
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def _ms(x):
    return "n/a" if x is None else f"{1e3 * x:.2f} ms"


def table_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    ph = result.get("phases", {})

    def status_row(name, p):
        rows.append((name, "status", p.get("status", "?"), "", ""))

    b = ph.get("build", {})
    if b.get("status") == "ok":
        g = GOALS["build_over_forward"]
        x = b["build_over_forward"]
        rows += [
            ("1 build", "build wall / forward-only wall (whole build() call)", f"{x:.3f}", f"<= {g}",
             "met" if x <= g else "not met"),
            ("1 build", "build loop / forward-only (prepare + teacher + writer wait)",
             f"{b['build_loop_over_forward']:.3f}", f"<= {g}",
             "met" if b["build_loop_over_forward"] <= g else "not met"),
            ("1 build", "samples/s: build / forward-only", f"{b['build_samples_per_second']:.2f} / "
             f"{b['forward_samples_per_second']:.2f}", "", ""),
            ("1 build", "GPU utilisation: build / forward-only",
             f"{b['build_gpu_util_percent']} % / {b['forward_gpu_util_percent']} % ({b['gpu_util_source']})"
             if b["gpu_util_source"] != "n/a" else "n/a", "", ""),
            ("1 build", "bytes per sample written (text / visual row, Gram per sample)",
             f"{b['bytes_per_sample']:,.0f} B ({b['cache']['bytes_per_text_row']} / "
             f"{b['cache']['bytes_per_visual_row']} B, {b['cache']['bytes_per_gram']} B)", "", ""),
            ("1 build", "forward-only achieved TFLOP/s (MFU)", f"{b['forward_tflops_per_second']:.1f}"
             + (f" ({100 * b['forward_mfu']:.0f} %)" if "forward_mfu" in b else ""), "", ""),
        ]
        ng = b.get("no_gram", {})
        if "over_forward" in ng:
            rows.append(("1 build", "build without Gram / forward-only (whole call; loop)",
                         f"{ng['over_forward']:.3f}; {ng['loop_over_forward']:.3f}", f"<= {g}",
                         "met" if ng["over_forward"] <= g else "not met"))
        bd = b["one_batch_breakdown_seconds"]
        rows.append(("1 build", f"one batch of {bd['samples']}: hidden / rows+top-k / Gram / host",
                     f"{bd['hidden_states']:.3f} / {bd['row_logits_and_topk']:.3f} / {bd['gram_factors']:.3f} / "
                     f"{bd['host_copies']:.3f} s", "", ""))
    else:
        status_row("1 build", b)
    t = ph.get("train", {})
    if t.get("status") == "ok":
        g = GOALS["dft_over_sft"]
        rows += [
            ("2 DFT vs SFT", "DFT step / SFT step (same student, same batch)", f"{t['dft_over_sft']:.3f}", f"<= {g}",
             "met" if t["dft_over_sft"] <= g else "not met"),
            ("2 DFT vs SFT", "step time SFT / DFT", f"{t['sft']['median_step_seconds']:.4f} / "
             f"{t['dft']['median_step_seconds']:.4f} s", "", ""),
            ("2 DFT vs SFT", "tokens/s SFT / DFT", f"{t['sft']['tokens_per_second']:,.0f} / "
             f"{t['dft']['tokens_per_second']:,.0f}", "", ""),
            ("2 DFT vs SFT", "peak GPU memory SFT / DFT", f"{_gib(t['sft']['peak_allocated_bytes'])} / "
             f"{_gib(t['dft']['peak_allocated_bytes'])}", "", ""),
            *[("2 DFT vs SFT", f"DFT step / SFT step at loss_chunk_size {c}" + (" (unchunked)" if c == "0" else ""),
               f"{r:.3f} (peak {_gib(t[f'dft_chunk{c}']['peak_allocated_bytes'])})", f"<= {g}",
               "met" if r <= g else "not met")
              for c, r in t.get("dft_over_sft_by_chunk", {}).items() if f"dft_chunk{c}" in t],
            ("3 cache vs online", "online step / DFT-from-cache step", f"{t['online_over_dft']:.2f}", "", ""),
            ("3 cache vs online", "peak GPU memory DFT-from-cache / online",
             f"{_gib(t['dft']['peak_allocated_bytes'])} / {_gib(t['online']['peak_allocated_bytes'])}"
             + (f" ({t['offline_peak_over_online_peak']:.3f})" if "offline_peak_over_online_peak" in t else ""),
             "", ""),
        ]
    else:
        status_row("2+3 train", t)
    r = ph.get("rdist", {})
    if r.get("status") == "ok":
        for v in r["vocabs"]:
            rows += [
                ("4 RDist", f"V={v['V']:,}: Z Zᵀ / H WᵀW Hᵀ (WᵀW precomputed), {r['samples_per_step']} samples",
                 f"{_ms(v['naive_seconds'])} / {_ms(v['cheap_precomputed_seconds'])} (x{v['speedup_precomputed']:.1f})",
                 "", ""),
                ("4 RDist", f"V={v['V']:,}: same, WᵀW formed per step", f"x{v['speedup_per_step']:.2f}", "", ""),
                ("4 RDist", f"V={v['V']:,}: forward + backward naive / cheap",
                 f"{_ms(v['naive_fwd_bwd_seconds'])} / {_ms(v['cheap_fwd_bwd_seconds'])} (x{v['speedup_fwd_bwd']:.2f})",
                 "", ""),
                ("4 RDist", f"V={v['V']:,}: extra peak memory naive / cheap (fwd+bwd)",
                 f"{_gib(v['naive_fwd_bwd_extra_bytes'])} / {_gib(v['cheap_fwd_bwd_extra_bytes'])}", "", ""),
            ]
    else:
        status_row("4 RDist", r)
    c = ph.get("chunked", {})
    if c.get("status") == "ok":
        base = c["runs"][0]
        for run in c["runs"]:
            what = "unchunked" if not run["chunk"] else f"chunks of {run['chunk']} rows"
            ratio = "" if run is base else (f" (x{run['seconds'] / base['seconds']:.2f} time, "
                                            f"x{run['extra_bytes'] / base['extra_bytes']:.2f} memory)"
                                            if base["extra_bytes"] else f" (x{run['seconds'] / base['seconds']:.2f})")
            rows.append(("4b loss", f"{c['rows']} rows, V={c['V']:,}, D={c['D']}, {c['dtype']}: {what}",
                         f"{_ms(run['seconds'])}, extra peak {_gib(run['extra_bytes'])}{ratio}",
                         "<= 1/4 memory at <= 1.10x time" if run is not base else "", ""))
    else:
        status_row("4b loss", c)
    a = ph.get("accelerate", {})
    if a.get("status") == "ok":
        for run in a["runs"]:
            val = run["status"]
            if run.get("seconds") is not None:
                val += f" ({run['seconds']} s)"
            st = run.get("accelerate_state") or {}
            if st.get("distributed_type"):
                val += f"; ran as {st['distributed_type'].replace('DistributedType.', '')}"
                if st.get("fsdp_plugin"):
                    val += f" (FSDP v{st.get('fsdp_version')})"
            rows.append(("5 accelerate", run["config"], val, "1 step", ""))
    else:
        status_row("5 accelerate", a)
    return rows


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# GPU check ({'smoke, CPU, tiny sizes: numbers mean nothing' if m['smoke'] else 'full sizes'})", "",
             f"card {m['card']}, driver {m['driver']}, torch {m['torch']} (CUDA {m['cuda']}), transformers "
             f"{m['transformers']}, accelerate {m['accelerate']}, Python {m['python']}; {m['date_utc']}; "
             f"{m.get('seconds_total', '?')} s of a {m['budget_seconds']:.0f} s budget.", "",
             "| phase | measure | value | goal | status |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(str(c).replace('|', '/') for c in row)} |" for row in table_rows(result)]
    tails = [r for r in result.get("phases", {}).get("accelerate", {}).get("runs", [])
             if r.get("status", "").startswith("fail")]
    for r in tails:
        lines += ["", f"`{r['config']}` output tail:", "", "```", r.get("tail", "")[-1500:], "```"]
    for name, p in result.get("phases", {}).items():
        if p.get("status", "").startswith("failed"):
            lines += ["", f"phase {name} failed:", "", "```", p.get("traceback", "")[-1500:], "```"]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out / "gpu_check.json")
    (out / "gpu_check.md").write_text(markdown(result))


# ------------------------------------------------------------------------------------------------ main


ESTIMATES = {"build": 150.0, "train": 60.0, "rdist": 15.0, "chunked": 15.0, "accelerate": 60.0}  # full size, seconds, for the budget


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--smoke", action="store_true", help="the same code paths at tiny sizes on the CPU (< 1 min)")
    ap.add_argument("--budget", type=float, default=None, help="total seconds (default 480 full, 240 smoke); "
                                                                "phases that would overrun are recorded as skipped")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)} (train, rdist "
                                                               "and accelerate need the build's cache)")
    ap.add_argument("--samples", type=int, default=None, help="samples of the build phase (default 320 full, 8 smoke)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--allow-cpu", action="store_true", help="run the full sizes without a GPU (hours; for tests "
                                                             "of this script only)")
    args = ap.parse_args(argv)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("TQDM_DISABLE", "1"), ("KD_PROGRESS", "lines")):
        os.environ.setdefault(k, v)
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = SMOKE if args.smoke else FULL
    if args.samples:
        sizes = dataclasses.replace(sizes, samples=args.samples)
    if args.budget:
        sizes = dataclasses.replace(sizes, budget=args.budget)
    if not args.smoke and not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("gpu_check: no CUDA device; run with --smoke for the CPU smoke run")
    dev = "cuda" if (not args.smoke and torch.cuda.is_available()) else "cpu"
    if dev == "cuda":
        torch.cuda.set_device(0)
        dev = "cuda:0"
    dtype = torch.bfloat16 if is_cuda(dev) else torch.float32
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"gpu_check: unknown phases {sorted(unknown)}; choose from {PHASES}")
    out = Path(args.out)
    budget = Budget(sizes.budget)
    work_ctx = tempfile.TemporaryDirectory(prefix="kd-gpu-check-") if args.work is None else None
    work = Path(args.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(sizes=sizes, smoke=args.smoke, dev=dev, dtype=dtype, work=work, budget=budget)
    result = {"meta": {**machine_info(dev), "smoke": args.smoke, "budget_seconds": sizes.budget,
                       "sizes": dataclasses.asdict(sizes), "dtype": str(dtype).replace("torch.", ""),
                       "goals": GOALS, "h200_reference": H200, "argv": sys.argv[1:] if argv is None else argv},
              "phases": {}}
    log(f"{'smoke' if args.smoke else 'full'} run on {result['meta']['card']} ({dev}), torch {torch.__version__}, "
        f"budget {sizes.budget:.0f}s; phases {', '.join(phases)}")
    setup_failed = False
    try:
        try:
            t0 = time.perf_counter()
            result["setup"] = setup(ctx)
            result["setup"]["status"] = "ok"
            result["setup"]["seconds_total"] = round(time.perf_counter() - t0, 2)
        except Exception as e:  # noqa: BLE001 - nothing else can run; record it and stop
            result["setup"] = {"status": f"failed: {type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()}
            log(f"setup failed:\n{traceback.format_exc()}")
            setup_failed = True
        write_outputs(result, out)
        funcs = {"build": phase_build, "train": phase_train, "rdist": phase_rdist, "chunked": phase_chunked,
                 "accelerate": phase_accelerate}
        for name in PHASES:
            if name not in phases or setup_failed:
                result["phases"][name] = {"status": "skipped: setup failed" if setup_failed
                                          else "skipped: not asked (--phases)"}
                continue
            need = 0.0 if args.smoke else ESTIMATES[name]
            if not budget.allows(need):
                result["phases"][name] = {"status": "skipped: time budget"}
                log(f"{name}: skipped (time budget: {budget.left():.0f}s left, needs ~{need:.0f}s)")
                write_outputs(result, out)
                continue
            log(f"phase {name}: start ({budget.left():.0f}s of the budget left)")
            t0 = time.perf_counter()
            try:
                res = funcs[name](ctx)
                res["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one failed phase must not cost the others their GPU time
                res = {"status": f"failed: {type(e).__name__}: {e}"[:800], "traceback": traceback.format_exc()}
                log(f"phase {name} failed:\n{traceback.format_exc()}")
            res["seconds"] = round(time.perf_counter() - t0, 1)
            result["phases"][name] = res
            free_memory(dev)
            result["meta"]["seconds_total"] = round(budget.elapsed(), 1)
            write_outputs(result, out)
    finally:
        ctx.teacher = None
        if work_ctx is not None:
            work_ctx.cleanup()
    result["meta"]["seconds_total"] = round(budget.elapsed(), 1)
    write_outputs(result, out)
    print(markdown(result), flush=True)
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({result['meta']['seconds_total']} s)")
    return result


if __name__ == "__main__":
    main()
