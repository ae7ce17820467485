"""`kd cache build`: run the teacher once over a dataset and write the cache (resumable, multi-process)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import queue
import tempfile
import time

import torch

from kd_cache import format as fmt
from kd_cache.backends import load_teacher, preflight as backend_preflight
from kd_cache.build_config import BuildConfig
from kd_cache.config import to_dict
from kd_cache.data import Encoder, RecordSource, SkipSample, max_images_for, sample_id_of
from kd_cache.files import atomic_write_bytes, atomic_write_text, remove_stale_temps
from kd_cache.hf import (load_processor_and_config, text_config, tokenizer_fingerprint, tokenizer_of,
                         weights_fingerprint)
from kd_cache.lock import BuildLock, is_lock_file
from kd_cache.manifest import done_path, read_done, try_finalize
from kd_cache.progress import progress, quiet_library_bars
from kd_cache.remote import RemoteOutput, is_remote
from kd_cache.targets import TargetOptions
from kd_cache.writer import ShardWriter, journal_path, read_journal

log = logging.getLogger("kd_cache")


def dist_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun / accelerate launch environment variables."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank} WORLD_SIZE={world}")
    return rank, world


def _check_out_dir(out: str, want: dict, what: str = "output folder") -> str:
    """'new' | 'resume' | 'complete'. Refuses folders holding something else, before any work starts."""
    if _empty_cache_folder(out):
        return "new"
    cfg_path = os.path.join(out, fmt.CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise ValueError(f"{what} {out} is not empty and holds no kd cache; choose an empty folder")
    with open(cfg_path, "rb") as f:
        try:
            saved = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise fmt.ProgressFileError(f"{cfg_path}: not valid JSON ({type(e).__name__}); the saved build "
                                        "configuration is damaged: restore it, or choose another folder") from None
    if not isinstance(saved, dict):
        raise fmt.ProgressFileError(f"{cfg_path}: must be a JSON object, got {type(saved).__name__}")
    _check_same_config(saved, want, f"{what} {out}")
    return "complete" if os.path.exists(os.path.join(out, fmt.MANIFEST_NAME)) else "resume"


def _empty_cache_folder(out: str) -> bool:
    """Nothing there yet, or only what a build creates before its configuration: build locks, empty `_progress/`
    and `shards/` folders (a build stopped right at its start), and the temporary file of `build_config.json`
    (another rank of this launch writing it at this moment)."""
    if not os.path.isdir(out):
        return not os.path.exists(out)
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if is_lock_file(name) and os.path.isfile(path):
            continue
        if name.startswith(f"{fmt.CONFIG_NAME}.tmp.") and os.path.isfile(path):
            continue
        if name in (fmt.PROGRESS_DIR, fmt.SHARD_DIR) and os.path.isdir(path) and not os.listdir(path):
            continue
        return False
    return True


def _complete_manifest(out: str) -> dict:
    """The manifest of the complete cache at `out`, checked as readers check it (the JSON as written)."""
    path = os.path.join(out, fmt.MANIFEST_NAME)
    with open(path) as f:
        return fmt.Manifest.parse(json.load(f), path).raw


def _check_same_config(saved: dict, want: dict, where: str) -> None:
    saved = fmt.saved_build_config(saved)
    have = {k: saved.get(k) for k in want}
    diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    if diff:
        lines = ", ".join(f"{k}: cache has {a!r}, this run asks {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{where} holds a cache built with a different configuration ({lines}); "
                         "use another --out or the original settings")


def build(cfg: BuildConfig) -> dict | None:
    """Build (or resume) the cache. Returns the manifest when this rank completed it, else None."""
    t_start = time.time()
    rank, world = dist_env()
    # ---- everything that can be wrong with the arguments fails here, before the teacher is loaded
    records = RecordSource(cfg.data)
    backend_preflight(cfg.backend)
    want = {"format_version": fmt.FORMAT_VERSION, "world_size": world, **cfg.semantic()}
    out, remote = cfg.out, None
    if is_remote(cfg.out):  # built in a local staging folder and uploaded shard by shard (kd_cache/remote.py)
        remote = RemoteOutput(cfg.out, cfg.staging, rank, world)
        if os.path.exists(os.path.join(remote.staging, fmt.MANIFEST_NAME)):  # staging is emptied as it uploads
            raise ValueError(f"staging folder {remote.staging} holds a complete kd cache ({fmt.MANIFEST_NAME}); a "
                             "build deletes what it stages once uploaded, so it does not stage in a cache: choose "
                             f"another --staging (to put that cache at {cfg.out}, copy the folder there, or "
                             "`kd cache publish` it to the hub)")
        saved, manifest = remote.probe()
        if saved is not None:
            _check_same_config(saved, want, cfg.out)
        if manifest is not None:
            log.info("cache at %s is already complete", cfg.out)
            return manifest
        out = remote.staging
        _check_out_dir(out, want, what="staging folder")
    elif _check_out_dir(out, want) == "complete":
        log.info("cache at %s is already complete", cfg.out)
        return _complete_manifest(cfg.out)
    teacher_files = load_processor_and_config(cfg.teacher, trust_remote_code=cfg.trust_remote_code,
                                              revision=cfg.revision)
    # ---- one writer per rank (kd_cache/lock.py): another build holding this rank's lock is named and refused here,
    # before this one writes anything; the lock is held until the build ends (kill -9 releases it too)
    lock = BuildLock(out, rank, world, what="output folder" if remote is None else "staging folder")
    try:
        return _build_locked(cfg, records, rank, world, want, out, remote, t_start, *teacher_files)
    finally:
        if remote is not None:
            remote.release_lock()  # its lock object on the URL, taken in _build_locked (kd_cache/remote_lock.py)
        lock.release()


def _build_locked(cfg: BuildConfig, records: RecordSource, rank: int, world: int, want: dict, out: str,
                  remote: RemoteOutput | None, t_start: float, config, processor, multimodal: bool) -> dict | None:
    """The rest of `build()`, with this rank's lock on `out` (the output or staging folder) held: prepare the
    folder, find the resume point, run the teacher over what is left, finalise."""
    if remote is None and os.path.exists(os.path.join(out, fmt.MANIFEST_NAME)):  # finished before the lock was ours
        log.info("cache at %s is already complete", cfg.out)
        return _complete_manifest(out)
    _prepare_folder(cfg, out, rank, world, want)
    tokenizer_files = save_teacher_tokenizer(processor, out)
    n_local = len(range(rank, len(records), world))
    if remote is not None:  # one writer of this rank's URL across machines too, before anything is uploaded
        remote.acquire_lock()
        remote.start(n_local)
    start = _resume_point(out, rank, world, n_local, check_shards=remote is None)  # remote: checked by start()
    if os.path.exists(done_path(out, rank, world)) and start >= n_local:
        log.info("rank %d already finished; finalizing", rank)
        header = read_done(out, rank, world).get("header")  # what the shards were written with (teacher dtype...)
        if header is None:  # a done file of an older kd: rebuilt without the loaded teacher
            header = _header(cfg, config, processor, None, records, multimodal, tokenizer_files=tokenizer_files)
        return _finalize(out, world, header, remote)
    if start:
        log.info("rank %d resuming at local sample %d of %d", rank, start, n_local)

    # Hashing the weight files (seconds per GB) runs beside the model load, which reads the same files.
    fingerprint = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kd-fingerprint")
    teacher_id_future = fingerprint.submit(weights_fingerprint, cfg.teacher,
                                           cfg.revision or getattr(config, "_commit_hash", None))
    fingerprint.shutdown(wait=False)
    quiet_library_bars()  # no loading bar frames in a log file (stderr not a terminal)
    # A vLLM engine is sized for its targets when it starts, before it can report its vocabulary: the options are
    # made from the config's, then remade in the rare case the loaded head is wider (a padded embedding table).
    opts = TargetOptions.from_config(cfg, int(text_config(config).vocab_size))
    t_load = time.perf_counter()
    teacher = load_teacher(cfg, records, opts)
    load_seconds = time.perf_counter() - t_load
    if teacher.vocab_size != opts.vocab_size:
        opts = TargetOptions.from_config(cfg, teacher.vocab_size)
    header = _header(cfg, config, processor, teacher_id_future.result(), records, multimodal, opts, teacher.dtype,
                     tokenizer_files=tokenizer_files)
    encoder = Encoder(processor, teacher.image_token_id, image_root=cfg.images, max_length=cfg.max_length,
                      max_images=max_images_for(config, cfg.max_images), append_eos=cfg.append_eos)
    writer = ShardWriter(out, rank, world, start=start, shard_size=cfg.shard_size,
                         teacher_fingerprint=header["teacher"]["fingerprint"], targets=header["targets"],
                         schema=fmt.schema(opts.text_kind, opts.visual_kind, opts.vocab_size),
                         compression_level=cfg.compression_level,
                         on_shard=remote.shard_written if remote is not None else None)
    try:
        done_samples, timings = _run(cfg, teacher, encoder, opts, writer, records, rank, world, start, n_local)
    finally:
        teacher.close()  # now rather than at exit: the vLLM engine's processes and threads, the model's memory
    wall = time.time() - t_start
    timings = {k: round(v, 3) for k, v in {"load_seconds": load_seconds, **timings}.items()}
    done = {"rank": rank, "samples_this_run": done_samples, "wall_seconds": round(wall, 3),
            "samples_per_second": round(done_samples / wall, 3) if wall > 0 else None,
            "writer_encode_seconds": round(writer.encode_seconds, 3), "device": str(teacher.device),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **timings, "header": header}
    atomic_write_text(done_path(out, rank, world), json.dumps(done, indent=1, sort_keys=True))
    manifest = _finalize(out, world, header, remote)
    if manifest is None:
        log.info("rank %d finished; the last rank to finish writes the manifest", rank)
    return manifest


def _prepare_folder(cfg: BuildConfig, out: str, rank: int, world: int, want: dict) -> None:
    """Remove what killed or failed runs left, create the folders, record the configuration."""
    for path in remove_stale_temps(out, rank, world):  # left by a killed (or out of space) earlier run
        log.info("removed the stale temporary file %s", path)
    os.makedirs(os.path.join(out, fmt.PROGRESS_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, fmt.SHARD_DIR), exist_ok=True)
    cfg_path = os.path.join(out, fmt.CONFIG_NAME)
    if not os.path.exists(cfg_path) or rank == 0:
        # The semantic fields decide the content (identical from every rank); `run` records this run's other
        # settings (batch size, device...), rewritten by rank 0 on each run. Atomic: no race to guard.
        run_settings = {k: v for k, v in to_dict(cfg).items() if k in cfg.NON_SEMANTIC}
        atomic_write_text(cfg_path, json.dumps({**want, "run": run_settings}, indent=1, sort_keys=True))


def _resume_point(out: str, rank: int, world: int, n_local: int, check_shards: bool = True) -> int:
    """This rank's next local sample: after the last shard recorded in its journal (checked; a torn tail dropped)
    and, with `check_shards`, present in `out` with its recorded size (a lost or damaged shard is redone)."""
    jpath = journal_path(out, rank, world)
    entries = read_journal(jpath, rank=rank, world_size=world, n_local=n_local)
    for i, e in enumerate(entries if check_shards else ()):
        path = os.path.join(out, e["shard"]) if e["shard"] is not None else None
        if path is not None and not (os.path.isfile(path) and os.path.getsize(path) == e["bytes"]):
            log.warning("rank %d: %s is recorded in %s but missing or of another size; resuming before it (%d of "
                        "%d entries kept)", rank, e["shard"], jpath, i, len(entries))
            entries = entries[:i]
            break
    end = entries[-1]["end"] if entries else 0
    if end < n_local and os.path.exists(done_path(out, rank, world)):  # before the journal is shortened: a
        os.remove(done_path(out, rank, world))  # finishing rank must never pair a done file with a short journal
    atomic_write_text(jpath, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    return end


def _run(cfg: BuildConfig, teacher, encoder: Encoder, opts: TargetOptions, writer: ShardWriter,
         records: RecordSource, rank: int, world: int, start: int, n_local: int) -> tuple[int, dict]:
    """The loop: prepare samples (DataLoader workers), run the teacher on the usable ones, hand results and skips
    to the writer in local order. Returns (samples handled, seconds per phase)."""
    timings = {"prepare_seconds": 0.0, "teacher_seconds": 0.0, "writer_wait_seconds": 0.0}
    loader = _loader(records, encoder, rank, world, start, n_local, cfg)
    bar = _progress(cfg.progress and rank == 0, n_local, start, rank)
    done_samples = skipped_here = 0
    closed = False  # the writer, flushed and stopped (else stopped in `finally`: `_stop_writer`)
    try:
        t_prep = time.perf_counter()
        for chunk in loader:
            timings["prepare_seconds"] += time.perf_counter() - t_prep
            ok = [(pos * world + rank, enc) for pos, enc, _ in chunk if enc is not None]
            t0 = time.perf_counter()
            results = {r.sample_index: r for r in teacher.targets(ok, opts)} if ok else {}
            timings["teacher_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for pos, enc, skip in chunk:
                if skip is not None:
                    skipped_here += 1
                    log.warning("skipped sample %s (index %d): %s", skip["sample_id"], skip["index"],
                                skip["reason"] + (f" ({skip['detail']})" if skip.get("detail") else ""))
                    writer.add(pos, skip=skip)
                else:
                    writer.add(pos, result=results[pos * world + rank])
            timings["writer_wait_seconds"] += time.perf_counter() - t0
            done_samples += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(skipped=skipped_here)
            t_prep = time.perf_counter()
        t0 = time.perf_counter()
        writer.close()
        closed = True
        timings["writer_wait_seconds"] += time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
        if not closed:
            _stop_writer(writer)
    return done_samples, timings


WRITER_STOP_SECONDS = 60.0


def _stop_writer(writer: ShardWriter, seconds: float = WRITER_STOP_SECONDS) -> None:
    """The build failed: the writer thread writes the shards it was already handed (each whole and journaled, so
    a rerun resumes after them; the partial one is dropped) and ends, within `seconds`. The process then never
    exits with that daemon thread inside pyarrow, where the interpreter's teardown would stop it mid-write."""
    deadline = time.monotonic() + seconds
    try:
        writer._queue.put(None, timeout=seconds)
    except queue.Full:
        log.warning("the shard writer did not take its stop signal within %.0f s; exiting without it", seconds)
        return
    writer._thread.join(max(0.0, deadline - time.monotonic()))
    if writer._thread.is_alive():
        log.warning("the shard writer was still writing %.0f s after the build failed; exiting without it", seconds)


def _finalize(out: str, world: int, header: dict, remote: RemoteOutput | None) -> dict | None:
    """The manifest if every rank is done (written last: locally, or uploaded after every shard it lists)."""
    return remote.complete(header) if remote is not None else try_finalize(out, world, header)


def _header(cfg: BuildConfig, config, processor, teacher_id, records, multimodal,
            opts: TargetOptions | None = None, dtype=None, tokenizer_files: list[dict] | None = None) -> dict:
    """Manifest fields that describe the build (identical on every rank). Without `opts` (no teacher loaded), the
    options are those of the config's vocabulary."""
    if teacher_id is None:
        teacher_id = weights_fingerprint(cfg.teacher, cfg.revision or getattr(config, "_commit_hash", None))
    teacher_id = dict(teacher_id)
    teacher_id.setdefault("fingerprint", _fp(teacher_id))
    teacher_id["model_type"] = config.model_type
    teacher_id["multimodal"] = multimodal
    if opts is None:
        opts = TargetOptions.from_config(cfg, text_config(config).vocab_size)
    vocab = opts.vocab_size
    image_processor = getattr(processor, "image_processor", None)
    return {
        "teacher": teacher_id,
        "backend": cfg.backend,
        "vocab_size": vocab,
        "tokenizer": tokenizer_fingerprint(processor),
        "image_processor": image_processor.to_dict() if image_processor is not None else None,
        "targets": {
            "text": fmt.TargetSpec(opts.text_kind, k=opts.text_k, samples=opts.samples).to_dict(),
            "visual": fmt.TargetSpec(opts.visual_kind, k=opts.visual_k, samples=opts.samples).to_dict(),
            "gram": {"enabled": opts.gram, "encoding": "lowrank-int8 or dense-upper-fp32 per sample"
                     if opts.gram_lowrank else "dense-upper-fp32", "tolerance": opts.gram_tolerance,
                     "vocab_size": vocab},
            "dtypes": {"input_ids": "int32", "positions": "int32", "ids": str(fmt.id_type(vocab)),
                       "topk_logprobs": fmt.LOGPROB_ENCODING, "sample_counts": "uint8",
                       "tail_logprob": "float32", "logsumexp": "float32"},
            "logprob_max_abs_error": fmt.LOGPROB_MAX_ABS_ERROR,
            "teacher_dtype": str(dtype or cfg.dtype).replace("torch.", ""),
        },
        "data": {"source": records.description, "fingerprint": records.fingerprint,
                 "images": os.path.abspath(cfg.images) if cfg.images else None, "num_records": len(records)},
        "config": cfg.semantic(),
        "tokenizer_files": tokenizer_files or [],
    }


def save_teacher_tokenizer(processor, out: str) -> list[dict]:
    """Write the teacher's tokenizer files (and its chat template) to `<out>/teacher_tokenizer/`, each atomically,
    so that a student of another tokenizer decodes the cached ids without the teacher's repository. Every rank
    writes the same bytes; returns the manifest's `tokenizer_files` entries (name, bytes, sha256)."""
    tok = tokenizer_of(processor)
    folder = os.path.join(out, fmt.TOKENIZER_DIR)
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kd-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        template = getattr(processor, "chat_template", None)
        if template and not os.path.exists(os.path.join(tmp, "chat_template.jinja")):
            with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(template)  # a processor's template (LLaVA's): the tokenizer's own files lack it
        entries = []
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                data = f.read()
            atomic_write_bytes(os.path.join(folder, name), data)
            entries.append({"name": f"{fmt.TOKENIZER_DIR}/{name}", "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
    return entries


def _fp(d: dict) -> str:
    return hashlib.sha256(json.dumps({k: d.get(k) for k in ("id", "revision", "weights_sha256")},
                                     sort_keys=True).encode()).hexdigest()[:16]


class _Prepared(torch.utils.data.Dataset):
    """Local position -> (position, EncodedSample | None, skip | None). Runs in DataLoader workers."""

    def __init__(self, records: RecordSource, encoder: Encoder, rank: int, world: int, start: int, stop: int):
        self.records, self.encoder, self.rank, self.world = records, encoder, rank, world
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        pos = self.start + i
        index = pos * self.world + self.rank
        sid = f"#{index}"
        try:
            record = self.records[index]
            sid = sample_id_of(record, index)
            return pos, self.encoder.encode(record, index), None
        except SkipSample as e:
            return pos, None, {"index": index, "sample_id": sid, "reason": e.reason, "detail": e.detail[:300]}


def _loader(records, encoder, rank, world, start, n_local, cfg: BuildConfig):
    ds = _Prepared(records, encoder, rank, world, start, n_local)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                                       collate_fn=list, prefetch_factor=4 if cfg.num_workers else None,
                                       persistent_workers=False)


def _progress(enabled: bool, total: int, initial: int, rank: int):
    """A bar on a terminal, a plain line every 30 s in a log (kd_cache/progress.py); None when disabled."""
    return progress(total, initial, desc="kd cache build", unit="sample", enabled=enabled)
