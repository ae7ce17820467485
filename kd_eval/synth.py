"""A procedural multimodal dataset whose answers are exact functions of the drawn scene.

Real benchmarks need downloads and big models; this one is seeded, offline and fast, and small enough
that tiny students on a 2-core CPU can learn it, so it shows that distillation moves a student toward its
teacher end to end. Scenes are 1-4 coloured shapes, each in its own cell of a 2x2 grid, so every question
("what colour is the shape at top left?", "is the circle left of the square?") has one unambiguous answer
that survives resizing to a tiny vision tower. Output is LLaVA JSON + an image folder, read by
`kd_cache.data` like any other dataset; every record also keeps its scene as structured metadata.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND",
    "CAPTION_PROMPT",
    "CELLS",
    "COLOURS",
    "AMBIGUOUS_TYPES",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "Scene",
    "SceneObject",
    "SynthPaths",
    "caption",
    "corpus",
    "generate",
    "make_ambiguous_question",
    "make_question",
    "object_centre",
    "render",
    "sample_scene",
]

RGB = tuple[int, int, int]

SHAPES = ("circle", "square", "triangle")
# Same RGB values as kd_eval.tiny, restricted to four hues that stay far apart after resizing.
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 30),
}
SIZES = ("small", "large")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # also the canonical caption order
BACKGROUND: RGB = (245, 245, 245)
QUESTION_TYPES = ("count", "colour", "spatial", "exists", "choice", "describe")
# Types whose answer has several right forms (the quality study's setting B): the record's answer is one of them,
# drawn at random, and `kd eval` scores any right form (set-F1 over listed items, or membership in a set).
AMBIGUOUS_TYPES = ("list", "name", "describe-any")
LIST_PROMPT = "What shapes are in the image?"
NAME_PROMPT = "Name a colour in the image."
CAPTION_PROMPT = "Describe the image briefly."

_ROW_COL = {cell: divmod(i, 2) for i, cell in enumerate(CELLS)}
# Half-extent of a shape as a fraction of the cell side; with the largest offset a large shape still
# stays inside its cell, so no shape ever straddles two positions.
_HALF = {"small": 0.2, "large": 0.34}
MAX_OFFSET = 3  # jitter, in 1/64ths of the image side (pixels at the default 64 px)
_LETTERS = "ABC"
_MAX_TRIES = 1000
_SPLITS = ("caption", "train", "val", "test")


# --------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One shape; `offset` (x, y) is a small jitter in 1/64ths of the image side, so images vary."""

    shape: str
    colour: str
    size: str
    cell: str
    offset: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("size", self.size, SIZES),
            ("cell", self.cell, CELLS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        off = tuple(self.offset)
        if len(off) != 2 or not all(isinstance(v, int) and abs(v) <= MAX_OFFSET for v in off):
            raise ValueError(f"offset must be two ints in [-{MAX_OFFSET}, {MAX_OFFSET}], got {self.offset!r}")
        object.__setattr__(self, "offset", off)

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at {self.cell}"


@dataclass(frozen=True)
class Scene:
    """1-4 objects in distinct grid cells, kept in canonical cell order (so equal scenes compare equal)."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        objs = tuple(self.objects)
        if not 1 <= len(objs) <= len(CELLS):
            raise ValueError(f"a scene needs 1 to {len(CELLS)} objects, got {len(objs)}")
        cells = [o.cell for o in objs]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must be in distinct cells, got {cells}")
        object.__setattr__(self, "objects", tuple(sorted(objs, key=lambda o: CELLS.index(o.cell))))

    def at(self, cell: str) -> SceneObject | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def layout(self) -> tuple[tuple[str, str, str, str], ...]:
        """The scene without jitter: what a caption or question can tell apart."""
        return tuple((o.shape, o.colour, o.size, o.cell) for o in self.objects)

    def to_dict(self) -> dict:
        return {"objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "cell": o.cell,
                             "offset": list(o.offset)} for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(SceneObject(o["shape"], o["colour"], o["size"], o["cell"], tuple(o.get("offset", (0, 0))))
                         for o in d["objects"]))


def sample_scene(rng: random.Random) -> Scene:
    """A random scene: 1-4 objects (uniform), distinct cells, independent uniform attributes."""
    n = rng.randint(1, len(CELLS))
    cells = rng.sample(CELLS, n)
    return Scene(tuple(
        SceneObject(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(SIZES), cell,
                    (rng.randint(-MAX_OFFSET, MAX_OFFSET), rng.randint(-MAX_OFFSET, MAX_OFFSET)))
        for cell in cells
    ))


def object_centre(obj: SceneObject, image_size: int) -> tuple[float, float]:
    """Pixel centre (x, y) of `obj` in a rendered image; always inside the shape, for any shape."""
    row, col = _ROW_COL[obj.cell]
    half_img = image_size / 2
    step = image_size / 64
    return (col + 0.5) * half_img + obj.offset[0] * step, (row + 0.5) * half_img + obj.offset[1] * step


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image (flat colours, no anti-aliasing, so pixels are exactly the palette)."""
    _check_image_size(image_size)
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = object_centre(o, image_size)
        h = _HALF[o.size] * image_size / 2
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif o.shape == "square":
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    return img


# --------------------------------------------------------------------------------------------- text


def caption(scene: Scene) -> str:
    """Deterministic caption listing objects in cell order: 'a large red circle at top left and a ...'."""
    parts = [o.phrase() for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _referents(scene: Scene) -> dict[str, str]:
    """cell -> shortest unique description ('circle', 'red circle', 'large red circle') of its object.

    Objects with no unique description are left out, so spatial questions never name an ambiguous object.
    """
    keys = (lambda o: (o.shape,), lambda o: (o.colour, o.shape), lambda o: (o.size, o.colour, o.shape))
    out = {}
    for o in scene.objects:
        for key in keys:
            if sum(key(p) == key(o) for p in scene.objects) == 1:
                out[o.cell] = " ".join(key(o))
                break
    return out


def make_question(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """A (question, answer) of type `qtype` about `scene`, or None when that type has no unambiguous question.

    Answers are canonical: a digit, a colour word, 'yes'/'no', an option letter or the caption. Yes/no types
    flip a fair coin for the answer first, so they are balanced by construction.
    """
    objs = scene.objects
    if qtype == "count":
        kind = rng.randrange(3)
        if kind == 0:
            return "How many shapes are there?", str(len(objs))
        if kind == 1:
            colour = rng.choice(tuple(COLOURS))
            return f"How many {colour} shapes are there?", str(sum(o.colour == colour for o in objs))
        shape = rng.choice(SHAPES)
        return f"How many {shape}s are there?", str(sum(o.shape == shape for o in objs))
    if qtype == "colour":
        o = rng.choice(objs)
        return f"What colour is the shape at {o.cell}?", o.colour
    if qtype == "spatial":
        refs = _referents(scene)
        options = [
            (a, b, axis)
            for a in objs if a.cell in refs
            for b in objs if b.cell in refs and b is not a
            for axis in (0, 1) if _ROW_COL[a.cell][axis] != _ROW_COL[b.cell][axis]
        ]
        if not options:
            return None
        a, b, axis = rng.choice(options)
        yes = rng.random() < 0.5
        before = _ROW_COL[a.cell][axis] < _ROW_COL[b.cell][axis]  # a above (axis 0) / left of (axis 1) b
        rel = ("above", "below") if axis == 0 else ("left of", "right of")
        return f"Is the {refs[a.cell]} {rel[0] if before == yes else rel[1]} the {refs[b.cell]}?", "yes" if yes else "no"
    if qtype == "exists":
        present = sorted({(o.colour, o.shape) for o in objs})
        yes = rng.random() < 0.5
        pool = present if yes else [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = rng.choice(pool)
        return f"Is there a {colour} {shape} in the image?", "yes" if yes else "no"
    if qtype == "choice":
        o = rng.choice(objs)
        if rng.random() < 0.5:
            question, truth, options = f"Which shape is at {o.cell}?", o.shape, list(SHAPES)
        else:
            question, truth = f"Which colour is the shape at {o.cell}?", o.colour
            options = rng.sample([c for c in COLOURS if c != o.colour], 2) + [o.colour]
        rng.shuffle(options)
        listed = " ".join(f"{_LETTERS[i]}. {opt}" for i, opt in enumerate(options))
        return f"{question} {listed}", _LETTERS[options.index(truth)]
    if qtype == "describe":
        return CAPTION_PROMPT, caption(scene)
    raise ValueError(f"qtype must be one of {QUESTION_TYPES}, got {qtype!r}")


def make_ambiguous_question(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str, dict]:
    """(question, one right answer drawn at random, how to score) for the types of AMBIGUOUS_TYPES.

    list: the objects as 'colour shape' items in a random order ('red circle, blue square and green triangle'),
    scored by set-F1 over the items ({"answer_items": [...]}); name: one colour of the scene, scored by membership
    ({"valid_answers": [...]}); describe-any: the caption's object phrases in a random order, scored by set-F1.
    """
    objs = list(scene.objects)
    if qtype == "list":
        items = [f"{o.colour} {o.shape}" for o in objs]
        rng.shuffle(items)
        return LIST_PROMPT, _join(items), {"answer_items": sorted(set(items))}
    if qtype == "name":
        colours = sorted({o.colour for o in objs})
        return NAME_PROMPT, rng.choice(colours), {"valid_answers": colours}
    if qtype == "describe-any":
        items = [o.phrase() for o in objs]
        rng.shuffle(items)
        return CAPTION_PROMPT, _join(items), {"answer_items": sorted(o.phrase() for o in objs)}
    raise ValueError(f"qtype must be one of {AMBIGUOUS_TYPES}, got {qtype!r}")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def corpus(ambiguous: bool = False) -> list[str]:
    """Sentences using every word and phrase the dataset can produce, to train a tiny tokenizer on.

    Built from the same templates as `make_question`, so a word added there and not here fails the tests.
    `ambiguous` adds the prompts of AMBIGUOUS_TYPES (kept apart so the default tokenizer stays as it was).
    """
    lines = [CAPTION_PROMPT, "How many shapes are there?", "0 1 2 3 4", "yes no", "A B C"]
    if ambiguous:
        lines += [LIST_PROMPT, NAME_PROMPT, "red circle, blue square and green triangle, yellow square"]
    for cell in CELLS:
        for size in SIZES:
            for colour in COLOURS:
                lines += [f"a {size} {colour} {shape} at {cell}" for shape in SHAPES]
        lines.append(f"What colour is the shape at {cell}? " + " ".join(COLOURS))
        lines.append(f"Which shape is at {cell}? A. circle B. square C. triangle")
        lines.append(f"Which colour is the shape at {cell}? A. red B. green C. blue")
    lines.append("a small red circle at top left, a large blue square at top right and a small green triangle at bottom left")
    for colour in COLOURS:
        lines.append(f"How many {colour} shapes are there? 0")
        lines += [f"Is there a {colour} {shape} in the image? yes" for shape in SHAPES]
    for shape in SHAPES:
        lines.append(f"How many {shape}s are there? 1")
    for rel in ("left of", "right of", "above", "below"):
        for a in SHAPES:
            lines += [f"Is the {a} {rel} the {b}? no" for b in SHAPES if b != a]
        lines.append(f"Is the large red circle {rel} the small yellow circle? yes")
        lines.append(f"Is the green square {rel} the blue square? no")
    return lines


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class SynthPaths:
    """Where `generate` wrote things; image paths inside the JSON files are relative to `image_root`."""

    out_dir: Path
    image_root: Path
    caption_train: Path
    instruct_train: Path
    instruct_val: Path
    instruct_test: Path
    meta: Path
    counts: dict[str, int] = field(default_factory=dict)
    lmms_task: Path | None = None  # the lmms-eval task folder of the test split, when one was asked for


def generate(
    out_dir: str | Path,
    *,
    n_caption: int = 1000,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 500,
    seed: int = 0,
    image_size: int = 64,
    question_types: Iterable[str] = QUESTION_TYPES,
    multi_turn: float = 0.1,
    caption_type: str = "describe",
    lmms_task: str | Path | None = None,
) -> SynthPaths:
    """Write the caption set and the train/val/test instruction sets; output depends only on the arguments.

    Each split draws from its own seeded stream, and no exact scene (layout and jitter) appears in two
    splits: test is drawn first, then val, train and caption, each rejecting scenes already used. Question
    types cycle in order, so every type gets the same share of each instruction split. A fraction
    `multi_turn` of train records (only) get a second, different question without an image placeholder.
    `lmms_task`: also write the test split as a local lmms-eval task in that folder (`kd_eval.lmms_task`).
    """
    for name, value in (("n_caption", n_caption), ("n_train", n_train), ("n_val", n_val), ("n_test", n_test),
                        ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    _check_image_size(image_size)
    types = _check_types(question_types)
    if caption_type not in ("describe", "describe-any"):
        raise ValueError(f"caption_type must be describe or describe-any, got {caption_type!r}")
    if isinstance(multi_turn, bool) or not isinstance(multi_turn, (int, float)) or not 0 <= multi_turn <= 1:
        raise ValueError(f"multi_turn must be a fraction in [0, 1], got {multi_turn!r}")
    if lmms_task is not None and n_test == 0:
        raise ValueError("lmms_task needs test records to write: n_test is 0")

    out = Path(out_dir)
    paths = SynthPaths(
        out_dir=out,
        image_root=out / "images",
        caption_train=out / "caption_train.json",
        instruct_train=out / "instruct_train.json",
        instruct_val=out / "instruct_val.json",
        instruct_test=out / "instruct_test.json",
        meta=out / "synth.json",
    )
    plan = (  # (split, n, json path, question types, multi-turn fraction), in drawing order
        ("test", n_test, paths.instruct_test, types, 0.0),
        ("val", n_val, paths.instruct_val, types, 0.0),
        ("train", n_train, paths.instruct_train, types, float(multi_turn)),
        ("caption", n_caption, paths.caption_train, (caption_type,), 0.0),
    )
    used: set[Scene] = set()
    layouts: dict[str, set] = {}
    stats: dict[str, dict] = {}
    for split, n, json_path, split_types, multi in plan:
        rng = random.Random(f"kd_eval.synth:{seed}:{split}")
        image_dir = paths.image_root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        for stale in image_dir.glob(f"{split}-*.png"):
            stale.unlink()
        records, scenes = [], []
        for i in range(n):
            record, scene = _make_record(split, i, split_types[i % len(split_types)], split_types, multi, rng, used)
            render(scene, image_size).save(paths.image_root / record["image"], format="PNG")
            records.append(record)
            scenes.append(scene)
        used.update(scenes)
        layouts[split] = {s.layout() for s in scenes}
        json_path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        by_type: dict[str, int] = {}
        for r in records:
            by_type[r["question_type"]] = by_type.get(r["question_type"], 0) + 1
        exists = [r["conversations"][1]["value"] == "yes" for r in records if r["question_type"] == "exists"]
        stats[split] = {
            "records": n,
            "question_types": by_type,
            "exists_yes_fraction": sum(exists) / len(exists) if exists else None,
            "multi_turn_records": by_type.get("multi", 0),
        }

    seen_layouts = layouts["train"] | layouts["caption"]
    for split in ("val", "test"):
        # Exact scenes never repeat, but a layout (jitter aside) can: there are only 96 one-object layouts.
        split_layouts = layouts[split]
        stats[split]["layouts_seen_in_training"] = (
            len(split_layouts & seen_layouts) / len(split_layouts) if split_layouts else None
        )
    counts = {split: stats[split]["records"] for split in _SPLITS}
    meta = {
        "generator": "kd_eval.synth",
        "version": 1,
        "seed": seed,
        "image_size": image_size,
        "question_types": list(types),
        "multi_turn": float(multi_turn),
        "caption_type": caption_type,
        "counts": counts,
        "splits": stats,
        "files": {
            "image_root": "images",
            "caption_train": paths.caption_train.name,
            "instruct_train": paths.instruct_train.name,
            "instruct_val": paths.instruct_val.name,
            "instruct_test": paths.instruct_test.name,
        },
    }
    task_folder = None
    if lmms_task is not None:
        from kd_eval.lmms_task import write_lmms_task

        task = write_lmms_task(paths.instruct_test, lmms_task, images=paths.image_root)
        task_folder = task.folder
        meta["lmms_task"] = {"folder": str(task.folder), "task": task.task, "records": task.n}
    paths.meta.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return dataclasses.replace(paths, counts=counts, lmms_task=task_folder)


def _make_record(
    split: str, i: int, qtype: str, types: tuple[str, ...], multi: float, rng: random.Random, used: set[Scene]
) -> tuple[dict, Scene]:
    """Draw an unused scene on which `qtype` has a question (redrawing otherwise) and build its record."""
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng)
        if scene in used:
            continue
        qa = make_ambiguous_question(scene, qtype, rng) if qtype in AMBIGUOUS_TYPES else make_question(scene, qtype, rng)
        if qa is not None:
            break
    else:  # pragma: no cover - needs a pathological question-type set
        raise RuntimeError(f"no unused scene with a {qtype!r} question after {_MAX_TRIES} draws")
    sample_id = f"{split}-{i:06d}"
    turns = [{"from": "human", "value": f"<image>\n{qa[0]}"}, {"from": "gpt", "value": qa[1]}]
    record: dict = {"id": sample_id, "image": f"{split}/{sample_id}.png", "conversations": turns, "question_type": qtype}
    if len(qa) == 3:  # an ambiguous type: how kd eval scores any right form
        record.update(qa[2])
    if multi and rng.random() < multi:
        second_types = [t for t in types if t != qtype] or [qtype]
        rng.shuffle(second_types)
        for t in second_types:
            if t in AMBIGUOUS_TYPES:  # a second turn is scored by exact match only: unambiguous types
                continue
            qa2 = make_question(scene, t, rng)
            if qa2 is not None and qa2[0] != qa[0]:
                turns += [{"from": "human", "value": qa2[0]}, {"from": "gpt", "value": qa2[1]}]
                record["question_type"] = "multi"
                record["turn_types"] = [qtype, t]
                break
    record["scene"] = scene.to_dict()
    return record, scene


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")


def _check_types(question_types: Iterable[str]) -> tuple[str, ...]:
    if isinstance(question_types, str):
        raise ValueError(f"question_types must be a sequence of type names, got {question_types!r}")
    given = list(question_types)
    types = tuple(dict.fromkeys(given))
    if not types or any(t not in QUESTION_TYPES + AMBIGUOUS_TYPES for t in types):
        raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES + AMBIGUOUS_TYPES}, "
                         f"got {given!r}")
    return types
