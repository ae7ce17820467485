"""The procedural dataset: exact answers, faithful pixels, determinism, disjoint splits, LLaVA-loadable records."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd_cache.data import RecordSource, build_messages, load_images
from kd_eval import synth
from kd_eval.synth import BACKGROUND, COLOURS, Scene, SceneObject

SIZES = dict(n_caption=24, n_train=96, n_val=36, n_test=60)

# Hand-built scene: circle top left, triangle top right, square bottom right, bottom left empty.
SCENE = Scene((
    SceneObject("square", "blue", "small", "bottom right", (2, -1)),
    SceneObject("circle", "red", "large", "top left", (-3, 3)),
    SceneObject("triangle", "green", "small", "top right"),
))


def words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+|\d+", text.replace("<image>", " ")))


def all_answers(scene: Scene, qtype: str, n: int = 200) -> dict[str, str]:
    """question -> answer over many rng draws (each question must always get the same answer)."""
    out: dict[str, str] = {}
    for s in range(n):
        q, a = synth.make_question(scene, qtype, random.Random(s))
        assert out.setdefault(q, a) == a, q
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> synth.SynthPaths:
    return synth.generate(tmp_path_factory.mktemp("synth"), seed=0, **SIZES)


def records(paths: synth.SynthPaths) -> dict[str, list[dict]]:
    files = {"caption": paths.caption_train, "train": paths.instruct_train, "val": paths.instruct_val,
             "test": paths.instruct_test}
    return {split: json.loads(f.read_text()) for split, f in files.items()}


# --------------------------------------------------------------------------------------------- answers


def test_count_answers():
    assert all_answers(SCENE, "count") == {
        "How many shapes are there?": "3",
        "How many red shapes are there?": "1",
        "How many green shapes are there?": "1",
        "How many blue shapes are there?": "1",
        "How many yellow shapes are there?": "0",
        "How many circles are there?": "1",
        "How many squares are there?": "1",
        "How many triangles are there?": "1",
    }
    two_red = Scene((SceneObject("circle", "red", "small", "top left"), SceneObject("circle", "red", "large", "bottom left")))
    answers = all_answers(two_red, "count")
    assert answers["How many red shapes are there?"] == "2" and answers["How many circles are there?"] == "2"


def test_colour_answers_only_ask_about_occupied_cells():
    assert all_answers(SCENE, "colour") == {
        "What colour is the shape at top left?": "red",
        "What colour is the shape at top right?": "green",
        "What colour is the shape at bottom right?": "blue",
    }


def test_spatial_answers_and_ambiguity():
    # circle/triangle share a row (no above/below question), triangle/square share a column (no left/right).
    assert all_answers(SCENE, "spatial", 400) == {
        "Is the circle left of the square?": "yes",
        "Is the circle right of the square?": "no",
        "Is the circle above the square?": "yes",
        "Is the circle below the square?": "no",
        "Is the square left of the circle?": "no",
        "Is the square right of the circle?": "yes",
        "Is the square above the circle?": "no",
        "Is the square below the circle?": "yes",
        "Is the circle left of the triangle?": "yes",
        "Is the circle right of the triangle?": "no",
        "Is the triangle left of the circle?": "no",
        "Is the triangle right of the circle?": "yes",
        "Is the triangle above the square?": "yes",
        "Is the triangle below the square?": "no",
        "Is the square above the triangle?": "no",
        "Is the square below the triangle?": "yes",
    }
    # Repeated shapes are named by the shortest unique description.
    two_circles = Scene((SceneObject("circle", "red", "small", "top left"), SceneObject("circle", "blue", "small", "top right")))
    assert all_answers(two_circles, "spatial") == {
        "Is the red circle left of the blue circle?": "yes",
        "Is the red circle right of the blue circle?": "no",
        "Is the blue circle left of the red circle?": "no",
        "Is the blue circle right of the red circle?": "yes",
    }
    # Indistinguishable objects, or a single one: nothing unambiguous to ask.
    twins = Scene((SceneObject("circle", "red", "large", "top left"), SceneObject("circle", "red", "large", "bottom right")))
    alone = Scene((SceneObject("square", "red", "large", "top left"),))
    rng = random.Random(0)
    assert synth.make_question(twins, "spatial", rng) is None
    assert synth.make_question(alone, "spatial", rng) is None
    # Twins are never named; the unique objects next to them still are.
    third = Scene(twins.objects + (SceneObject("circle", "red", "small", "top right"),))
    assert synth.make_question(third, "spatial", rng) is None
    fourth = Scene(third.objects + (SceneObject("square", "blue", "large", "bottom left"),))
    assert all_answers(fourth, "spatial") == {
        "Is the small red circle left of the square?": "no",
        "Is the small red circle right of the square?": "yes",
        "Is the small red circle above the square?": "yes",
        "Is the small red circle below the square?": "no",
        "Is the square left of the small red circle?": "yes",
        "Is the square right of the small red circle?": "no",
        "Is the square above the small red circle?": "no",
        "Is the square below the small red circle?": "yes",
    }


def test_exists_answers():
    present = {("red", "circle"), ("green", "triangle"), ("blue", "square")}
    answers = all_answers(SCENE, "exists")
    assert {"yes", "no"} == set(answers.values())
    for q, a in answers.items():
        colour, shape = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", q).groups()
        assert a == ("yes" if (colour, shape) in present else "no"), q


def test_choice_answers_point_at_the_truth():
    answers = all_answers(SCENE, "choice", 300)
    kinds = set()
    for q, a in answers.items():
        m = re.fullmatch(r"Which (shape is|colour is the shape) at ([a-z ]+)\? A\. (\w+) B\. (\w+) C\. (\w+)", q)
        assert m, q
        kind, cell, *options = m.groups()
        obj = SCENE.at(cell)
        truth = obj.shape if kind == "shape is" else obj.colour
        assert options.count(truth) == 1 and len(set(options)) == 3
        assert a == "ABC"[options.index(truth)]
        kinds.add(kind)
    assert kinds == {"shape is", "colour is the shape"}
    assert {"A", "B", "C"} == set(answers.values())


def test_describe_and_caption():
    expected = "a large red circle at top left, a small green triangle at top right and a small blue square at bottom right"
    assert synth.caption(SCENE) == expected
    assert synth.make_question(SCENE, "describe", random.Random(0)) == ("Describe the image briefly.", expected)
    two = Scene((SceneObject("square", "blue", "small", "bottom right"), SceneObject("circle", "red", "large", "top left")))
    assert synth.caption(two) == "a large red circle at top left and a small blue square at bottom right"
    with pytest.raises(ValueError, match="got 'bogus'"):
        synth.make_question(SCENE, "bogus", random.Random(0))


# --------------------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("size", [64, 48])
def test_render_pixels_match_scene(size):
    img = synth.render(SCENE, size)
    assert img.mode == "RGB" and img.size == (size, size)
    arr = np.asarray(img)
    palette = {tuple(c) for c in COLOURS.values()} | {BACKGROUND}
    assert {tuple(p) for p in arr.reshape(-1, 3)} <= palette  # flat colours, no blending
    for obj in SCENE.objects:
        x, y = synth.object_centre(obj, size)
        assert tuple(arr[int(y), int(x)]) == COLOURS[obj.colour], obj
    half = size // 2
    assert (arr[half:, :half] == BACKGROUND).all()  # bottom left cell is empty
    for y, x in [(0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)]:
        assert tuple(arr[y, x]) == BACKGROUND
    # Shapes are what they say: a square fills its bounding-box corner, a circle does not.
    sq = Scene((SceneObject("square", "red", "large", "top left"),))
    ci = Scene((SceneObject("circle", "red", "large", "top left"),))
    x, y = synth.object_centre(sq.objects[0], size)
    corner = (int(y - 0.3 * half), int(x - 0.3 * half))
    assert tuple(np.asarray(synth.render(sq, size))[corner]) == COLOURS["red"]
    assert tuple(np.asarray(synth.render(ci, size))[corner]) == BACKGROUND


def test_colours_survive_resizing_to_a_tiny_tower():
    rng = random.Random(7)
    names, rgb = list(COLOURS), np.array(list(COLOURS.values()), dtype=float)
    for _ in range(30):
        scene = synth.sample_scene(rng)
        small = np.asarray(synth.render(scene, 64).resize((32, 32), Image.BICUBIC), dtype=float)
        for obj in scene.objects:
            x, y = synth.object_centre(obj, 64)
            pixel = small[int(y / 2), int(x / 2)]
            assert names[int(np.argmin(((rgb - pixel) ** 2).sum(1)))] == obj.colour


# --------------------------------------------------------------------------------------------- files


def test_layout_records_and_meta(data):
    recs = records(data)
    assert [len(recs[s]) for s in ("caption", "train", "val", "test")] == [SIZES[k] for k in SIZES]
    for split, rs in recs.items():
        for r in rs:
            assert r["image"] == f"{split}/{r['id']}.png"
            assert (data.image_root / r["image"]).is_file()
            turns = r["conversations"]
            assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            if split == "train" and r["question_type"] == "multi":
                assert len(turns) == 4 and len(r["turn_types"]) == 2
            else:
                assert len(turns) == 2 and r["question_type"] in synth.QUESTION_TYPES
            # The stored scene is the drawn one, and its answers follow from it.
            scene = Scene.from_dict(r["scene"])
            assert np.array_equal(np.asarray(Image.open(data.image_root / r["image"])), np.asarray(synth.render(scene)))
            if r["question_type"] == "describe":
                assert turns[1]["value"] == synth.caption(scene)
    assert {r["question_type"] for r in recs["caption"]} == {"describe"}
    for split in ("val", "test"):  # types cycle, so each gets an equal share
        counts = [sum(r["question_type"] == t for r in recs[split]) for t in synth.QUESTION_TYPES]
        assert max(counts) - min(counts) <= 1
    assert any(r["question_type"] == "multi" for r in recs["train"])
    meta = json.loads(data.meta.read_text())
    assert meta["seed"] == 0 and meta["image_size"] == 64 and meta["counts"] == data.counts
    assert data.counts == {"caption": 24, "train": 96, "val": 36, "test": 60}


def test_splits_are_disjoint(data):
    recs = records(data)
    scenes = {s: {Scene.from_dict(r["scene"]) for r in rs} for s, rs in recs.items()}
    splits = list(scenes)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not scenes[a] & scenes[b], (a, b)
    ids = [r["id"] for rs in recs.values() for r in rs]
    assert len(ids) == len(set(ids))


def test_deterministic_and_seed_dependent(tmp_path, data):
    again = synth.generate(tmp_path / "again", seed=0, **SIZES)
    assert tree_bytes(again.out_dir) == tree_bytes(data.out_dir)
    other = synth.generate(tmp_path / "other", seed=1, **SIZES)
    for name in ("instruct_test.json", "instruct_train.json", "caption_train.json"):
        assert (other.out_dir / name).read_bytes() != (data.out_dir / name).read_bytes()
    assert (other.image_root / "test/test-000000.png").read_bytes() != (data.image_root / "test/test-000000.png").read_bytes()
    # A split depends on its own size and the seed, not on how big the other splits are.
    bigger = synth.generate(tmp_path / "bigger", seed=0, **{**SIZES, "n_train": 10, "n_caption": 3})
    assert bigger.instruct_test.read_bytes() == data.instruct_test.read_bytes()
    # Regenerating smaller into the same folder leaves no stale images behind.
    synth.generate(tmp_path / "bigger", seed=0, n_caption=1, n_train=2, n_val=1, n_test=1)
    assert len(list((tmp_path / "bigger/images/train").iterdir())) == 2


def test_yes_no_balance(tmp_path):
    paths = synth.generate(tmp_path, n_caption=0, n_train=0, n_val=0, n_test=400, question_types=["exists", "spatial"])
    recs = json.loads(paths.instruct_test.read_text())
    for qtype in ("exists", "spatial"):
        answers = [r["conversations"][1]["value"] for r in recs if r["question_type"] == qtype]
        assert len(answers) == 200 and set(answers) == {"yes", "no"}
        assert abs(answers.count("yes") / len(answers) - 0.5) < 0.1, qtype


def test_records_load_through_kd_cache(data):
    for split, rs in records(data).items():
        source = RecordSource(str(getattr(data, "caption_train" if split == "caption" else f"instruct_{split}")))
        assert len(source) == len(rs)
        for r in source:
            images = load_images(r, data.image_root)
            assert len(images) == 1 and images[0].size == (64, 64)
            messages = build_messages(r["conversations"], len(images))
            assert messages[0]["content"][0] == {"type": "image"}
            assert messages[1]["content"] == [{"type": "text", "text": r["conversations"][1]["value"]}]
            assert len(messages) == len(r["conversations"])


def test_corpus_covers_every_word(data):
    vocab = set().union(*(words(line) for line in synth.corpus()))
    used: set[str] = set()
    for rs in records(data).values():
        for r in rs:
            for turn in r["conversations"]:
                used |= words(turn["value"])
    rng = random.Random(0)
    for _ in range(300):
        scene = synth.sample_scene(rng)
        for qtype in synth.QUESTION_TYPES:
            qa = synth.make_question(scene, qtype, rng)
            if qa:
                used |= words(" ".join(qa))
    assert used and used <= vocab, sorted(used - vocab)


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        (dict(n_train=-1), "-1"),
        (dict(n_val=1.5), "1.5"),
        (dict(seed=True), "True"),
        (dict(image_size=8), "8"),
        (dict(image_size="64"), "'64'"),
        (dict(question_types="count"), "'count'"),
        (dict(question_types=["count", "bogus"]), "'bogus'"),
        (dict(question_types=[]), r"\[\]"),
        (dict(multi_turn=1.5), "1.5"),
    ],
)
def test_generate_refuses_bad_arguments(tmp_path, kwargs, bad):
    with pytest.raises(ValueError, match=f"got .*{bad}"):
        synth.generate(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.parametrize(
    "make,bad",
    [
        (lambda: SceneObject("hexagon", "red", "small", "top left"), "'hexagon'"),
        (lambda: SceneObject("circle", "purple", "small", "top left"), "'purple'"),
        (lambda: SceneObject("circle", "red", "medium", "top left"), "'medium'"),
        (lambda: SceneObject("circle", "red", "small", "centre"), "'centre'"),
        (lambda: SceneObject("circle", "red", "small", "top left", (9, 0)), r"\(9, 0\)"),
        (lambda: Scene(()), "0"),
        (lambda: Scene((SceneObject("circle", "red", "small", "top left"),) * 2), "top left"),
        (lambda: synth.render(SCENE, 4), "4"),
    ],
)
def test_scene_refuses_bad_values(make, bad):
    with pytest.raises(ValueError, match=f"got .*{bad}"):
        make()


def test_ambiguous_types_draw_one_right_form_and_record_how_to_score(tmp_path):
    import json

    from kd_eval import synth
    from kd_eval.evaluate import answer_score

    paths = synth.generate(tmp_path, n_caption=12, n_train=30, n_val=0, n_test=6, seed=1, image_size=32,
                           question_types=synth.AMBIGUOUS_TYPES, multi_turn=0.0, caption_type="describe-any")
    records = json.loads(paths.instruct_train.read_text()) + json.loads(paths.caption_train.read_text())
    orders = set()
    for r in records:
        answer = r["conversations"][1]["value"]
        assert answer_score(answer, answer, r) == 1.0  # the drawn form is one of the right ones
        scene = synth.Scene.from_dict(r["scene"])
        if r["question_type"] == "name":
            assert r["valid_answers"] == sorted({o.colour for o in scene.objects})
        elif r["question_type"] == "list":
            assert r["answer_items"] == sorted({f"{o.colour} {o.shape}" for o in scene.objects})
        else:
            assert r["answer_items"] == sorted(o.phrase() for o in scene.objects)
            if len(scene.objects) > 1:
                orders.add(answer == synth._join(sorted(r["answer_items"])))
    assert orders == {True, False}  # the order varies: the label alone does not fix it
    assert {r["question_type"] for r in records} == set(synth.AMBIGUOUS_TYPES)
    words = " ".join(synth.corpus(ambiguous=True))
    assert synth.LIST_PROMPT in words and synth.NAME_PROMPT in words
