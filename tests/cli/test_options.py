"""Every option of every `kd` command reaches the resolved config, and real runs save it.

Two layers: (1) walk the click tree of the real app; for every option of every config-backed command pass one
non-default value and assert the resolved config holds it; (2) real runs of build / train / compose / synth /
eval with many non-default flags at once, reading the saved config (build_config.json, train_config.json, ...)
and what the run made (a sampled cache really is sampled).
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import kd_cli.config
from kd_cache import format as fmt
from kd_cache import build_config
from kd_cache.config import MISSING
from kd_cli.main import app

runner = CliRunner()


class Resolved(Exception):
    """Raised by the patched resolve() to stop a command once its config exists."""

    def __init__(self, cfg):
        super().__init__("resolved")
        self.cfg = cfg


def config_commands() -> list[tuple[str, object, type]]:
    """(name, click command, config class) for every command generated from a config dataclass."""
    found = []

    def walk(cmd, path: list[str]) -> None:  # typer vendors click: duck-typed, not isinstance(click.Group)
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])
        elif getattr(cmd.callback, "config_class", None) is not None:
            found.append((" ".join(path), cmd, cmd.callback.config_class))

    walk(typer.main.get_command(app), [])
    return found


def test_every_config_command_is_found():
    names = {name for name, _, _ in config_commands()}
    assert names == {"cache build", "train", "student compose", "data synth", "eval", "demo"}


def test_format_target_kinds_match_the_torch_free_copy():
    assert build_config.TARGET_KINDS == fmt.TARGET_KINDS


def test_every_field_has_an_option_with_its_default_in_help():
    for name, cmd, cls in config_commands():
        opts = {p.name: p for p in cmd.params if p.param_type_name == "option"}
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                continue
            assert f.name in opts, f"{name}: field {f.name} has no option"
            text = opts[f.name].help or ""
            assert text.strip() and not re.search(r"\s\.(\s|$)", text), (name, f.name, text)  # "Learning rate ."
            if f.default is MISSING:
                assert "Required" in text, (name, f.name, text)
            else:
                assert "[default: " in text, (name, f.name, text)
        help_out = runner.invoke(app, name.split() + ["--help"], env={"COLUMNS": "250"}).output
        assert "[default: " in help_out, name


def _base_type(cls, name):
    return kd_cli.config._base_type(typing.get_type_hints(cls)[name])


# field -> (value passed on the command line, value expected in the config) where a generic one will not do
SPECIAL = {
    "targets": ("sampled", "sampled"), "gram_tolerance": ("0.001", 0.001), "warmup_ratio": ("0.1", 0.1),
    "jsd_beta": ("0.25", 0.25), "multi_turn": ("0.5", 0.5), "question_types": ("count,colour", "count,colour"),
    "trackers": ("jsonl,tensorboard", "jsonl,tensorboard"), "vision_feature_layer": ("-2", -2),
    "compression_level": ("5", 5),
}


def non_default(cls, f: dataclasses.Field, tmp: Path) -> tuple[str | None, object]:
    """(argument, expected value) for one field: a value the command accepts that is not the default."""
    if f.name in SPECIAL:
        return SPECIAL[f.name]
    typ = _base_type(cls, f.name)
    if f.metadata.get("choices"):
        choice = next(c for c in f.metadata["choices"] if c != f.default)
        return choice, choice
    if typ is bool:
        return None, not f.default if f.default is not None else True
    if typ is int:
        v = (f.default or 0) + 3
        return str(v), v
    if typ is float:
        v = (f.default or 0.0) + 0.5
        return str(v), v
    if f.name in ("images", "dpt_images"):
        folder = tmp / f.name
        folder.mkdir(exist_ok=True)
        return str(folder), str(folder)
    return f"value-of-{f.name}", f"value-of-{f.name}"


def base_args(name: str, tmp: Path) -> dict[str, str]:
    """The minimum each command needs, as --flag: value."""
    return {
        "cache build": {"--teacher": "t", "--data": "d.json", "--out": str(tmp / "o")},
        "train": {"--student": "s", "--out": str(tmp / "o"), "--stage": "dft", "--cache": "c", "--data": "d.json"},
        "student compose": {"--out": str(tmp / "o"), "--vision": "v", "--llm": "l"},
        "data synth": {"--out": str(tmp / "o")},
        "eval": {"--model": "m", "--data": "d.json"},
        "demo": {},
    }[name]


# fields whose non-default value needs other arguments changed to stay valid
ADJUST = {
    ("cache build", "staging"): {"--out": "s3://bucket/cache"},
    ("train", "recipe"): {"--stage": None},
    ("train", "online_teacher"): {"--cache": None},
    ("train", "keep_best"): {"--val-data": "v.json", "--val-every": "5"},
}


@pytest.mark.parametrize("name,cmd,cls", config_commands(), ids=[n for n, _, _ in config_commands()])
def test_every_option_reaches_the_resolved_config(name, cmd, cls, tmp_path, monkeypatch):
    real_resolve = kd_cli.config.resolve

    def capture(*a, **k):
        raise Resolved(real_resolve(*a, **k))

    monkeypatch.setattr(kd_cli.config, "resolve", capture)
    flags = {p.name: p for p in cmd.params if p.param_type_name == "option"}
    checked = 0
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        opt = flags[f.name]
        value, expected = non_default(cls, f, tmp_path)
        args = {**base_args(name, tmp_path), **ADJUST.get((name, f.name), {})}
        if value is None:  # a bool: its on or off spelling
            spelled = opt.opts[0] if expected else opt.secondary_opts[0]
            args[spelled] = ""
        else:
            args[opt.opts[0]] = value
        argv = name.split() + [x for k, v in args.items() if v is not None for x in ((k, v) if v != "" else (k,))]
        r = runner.invoke(app, argv)
        assert isinstance(r.exception, Resolved), (argv, r.output, r.exception)
        got = getattr(r.exception.cfg, f.name)
        assert got == expected, f"{name}: {argv} gave {f.name}={got!r}, expected {expected!r}"
        assert got != f.default, f"{name}: {f.name} value {got!r} is the default; the walk proves nothing"
        checked += 1
    assert checked >= 4


def test_config_file_then_flags(tmp_path, monkeypatch):
    real_resolve = kd_cli.config.resolve
    monkeypatch.setattr(kd_cli.config, "resolve", lambda *a, **k: (_ for _ in ()).throw(Resolved(real_resolve(*a, **k))))
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"student": "s", "out": "o", "stage": "sft", "data": "d.json", "lr": 0.5,
                               "max-grad-norm": 2.0, "use_tail": False}))
    r = runner.invoke(app, ["train", "--config", str(cfg), "--lr", "0.25", "--tail"])
    c = r.exception.cfg
    assert (c.lr, c.max_grad_norm, c.use_tail, c.stage) == (0.25, 2.0, True, "sft")


def test_missing_required_and_bad_choice_are_one_line_errors(tmp_path):
    r = runner.invoke(app, ["cache", "build", "--data", "d.json"])
    assert r.exit_code == 2 and "missing required option --teacher, --out" in r.output, r.output
    r = runner.invoke(app, ["cache", "build", "--teacher", "t", "--data", "d", "--out", "o", "--targets", "bogus"])
    assert r.exit_code == 2 and "bogus" in r.output


@pytest.mark.parametrize("name,cmd,cls", config_commands(), ids=[n for n, _, _ in config_commands()])
def test_every_declared_choice_is_checked_in_a_config_file_too(name, cmd, cls, tmp_path):
    """The CLI checks choices given as flags; a config file's values reach the config unchecked by it, and the
    config's own check (`kd_cache.config.check_choices`, from the field's declared choices) refuses them."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("choices"):
            continue
        path = tmp_path / f"{f.name}.json"
        path.write_text(json.dumps({f.name: "bogus"}))
        args = {**base_args(name, tmp_path), **ADJUST.get((name, f.name), {})}
        args.pop("--" + f.name.replace("_", "-"), None)  # a flag would win over the file
        argv = name.split() + ["--config", str(path)] + [x for k, v in args.items() if v is not None for x in (k, v)]
        r = runner.invoke(app, argv)
        flag = "--" + f.name.replace("_", "-")  # the error names the option as the CLI spells it
        assert r.exit_code == 2 and f"{flag} must be one of" in r.output and "'bogus'" in r.output, (argv, r.output)


# ------------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, llava_teacher, tiny_data):
    """`kd cache build` with nearly every option off its default."""
    data, images = tiny_data
    out = tmp_path_factory.mktemp("opts") / "cache"
    args = ["cache", "build", "--teacher", str(llava_teacher), "--data", str(data), "--images", str(images),
            "--out", str(out), "--targets", "sampled", "--visual-targets", "topk", "--samples", "20", "--seed", "3", "--gram-encoding", "dense",
            "--gram-tolerance", "0.001", "--top-k", "8", "--visual-top-k", "4", "--max-length", "600",
            "--max-images", "1", "--shard-size", "5", "--no-append-eos", "--dtype", "float32", "--revision", "main",
            "--trust-remote-code", "--batch-size", "2", "--device", "cpu", "--num-workers", "1",
            "--compression-level", "5", "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return out


def test_cache_build_saves_every_flag_and_builds_what_they_say(sampled_cache):
    saved = json.loads((sampled_cache / fmt.CONFIG_NAME).read_text())
    expect = {"targets": "sampled", "visual_targets": "topk", "samples": 20, "seed": 3, "gram_encoding": "dense", "gram_tolerance": 0.001,
              "top_k": 8, "visual_top_k": 4, "max_length": 600, "max_images": 1, "shard_size": 5,
              "append_eos": False, "dtype": "float32", "revision": "main", "trust_remote_code": True,
              "compression_level": 5}
    assert {k: saved[k] for k in expect} == expect
    assert saved["run"] == {"batch_size": 2, "device": "cpu", "num_workers": 1, "progress": False,
                            "out": str(sampled_cache), "staging": None}
    manifest = json.loads((sampled_cache / fmt.MANIFEST_NAME).read_text())
    assert manifest["targets"]["text"]["kind"] == "sampled" and manifest["targets"]["text"]["samples"] == 20
    assert manifest["targets"]["visual"] == {"kind": "topk", "k": 4, "logprob_encoding": fmt.LOGPROB_ENCODING}
    assert manifest["targets"]["gram"]["encoding"] == "dense-upper-fp32"
    card = (sampled_cache / fmt.CARD_NAME).read_text()
    assert "`append_eos` off: nothing appended" in card
    assert ("20 draws from the teacher distribution (unique ids + counts) and the logsumexp at the response rows, the "
            "top-4 log-probs, tail mass and logsumexp at the visual\nrows") in card


def test_train_saves_every_flag(tmp_path, llava_topk_cache, llava_teacher, tiny_data):
    data, images = tiny_data
    out = tmp_path / "run"
    args = ["train", "--student", str(llava_teacher), "--out", str(out), "--stage", "dft", "--cache",
            str(llava_topk_cache), "--data", str(data), "--images", str(images), "--lr", "0.0003", "--train-vision",
            "--freeze-projector", "--train-llm", "--epochs", "2", "--max-steps", "1", "--batch-size", "2",
            "--grad-accum", "2", "--warmup-ratio", "0.1", "--weight-decay", "0.01", "--max-grad-norm", "0.5",
            "--ce-weight", "0.5", "--mdist-text-weight", "2", "--mdist-visual-weight", "0.5", "--rdist-weight", "0",
            "--kind", "jsd", "--temperature", "2", "--no-tail", "--jsd-beta", "0.25", "--seed", "5",
            "--shuffle-buffer", "8", "--checkpoint-every", "1", "--keep-checkpoints", "1", "--log-every", "2",
            "--mixed-precision", "no", "--skip-corrupt-shards", "--skip-missing-images", "--quiet",
            "--label-smoothing", "0.1", "--visual-temperature", "3", "--val-data", str(data), "--val-images",
            str(images), "--val-every", "1", "--append-eos", "--loss-chunk-size", "5", "--gradient-checkpointing",
            "--lora-r", "2", "--lora-alpha", "4", "--lora-targets", "q_proj,v_proj", "--lora-dropout", "0.1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "train_config.json").read_text())["config"]
    expect = {"lr": 0.0003, "train_vision": True, "train_projector": False, "train_llm": True, "epochs": 2,
              "max_steps": 1, "batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.1, "weight_decay": 0.01,
              "max_grad_norm": 0.5, "ce_weight": 0.5, "mdist_text_weight": 2.0, "mdist_visual_weight": 0.5,
              "rdist_weight": 0.0, "kind": "jsd", "temperature": 2.0, "use_tail": False, "jsd_beta": 0.25,
              "seed": 5, "shuffle_buffer": 8, "checkpoint_every": 1, "keep_checkpoints": 1, "log_every": 2,
              "mixed_precision": "no", "skip_corrupt_shards": True, "skip_missing_images": True, "progress": False,
              "label_smoothing": 0.1, "visual_temperature": 3.0, "val_data": str(data), "val_images": str(images),
              "val_every": 1, "append_eos": True, "loss_chunk_size": 5, "gradient_checkpointing": True, "lora_r": 2,
              "lora_alpha": 4.0, "lora_targets": "q_proj,v_proj", "lora_dropout": 0.1}
    assert {k: saved[k] for k in expect} == expect
    stage = json.loads((out / "final" / "kd_stage.json").read_text())  # the LoRA run happened, and was merged
    assert stage["lora"] == {"r": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"], "merged": True}
    loss = json.loads((out / "train_config.json").read_text())["loss"]
    assert (loss["kind"], loss["temperature"], loss["use_tail"], loss["rdist_weight"]) == ("jsd", 2.0, False, 0.0)
    assert (loss["label_smoothing"], loss["visual_temperature"]) == (0.1, 3.0)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_nll" in row for row in logged)  # --val-data was scored


def test_train_saves_what_an_unset_loss_chunk_size_resolved_to(tmp_path, llava_teacher, tiny_data):
    """Unset `--loss-chunk-size` is saved as unset (a rerun elsewhere resolves it for its own device) beside the
    size this run used: 96 rows here (no GPU), the given size when one is given."""
    import torch

    data, images = tiny_data
    for given, want in ((None, 1024 if torch.cuda.is_available() else 96), ("0", 0)):
        out = tmp_path / f"run-{given}"
        args = ["train", "--student", str(llava_teacher), "--out", str(out), "--stage", "sft", "--data", str(data),
                "--images", str(images), "--max-steps", "1", "--quiet"]
        r = runner.invoke(app, args + ([] if given is None else ["--loss-chunk-size", given]))
        assert r.exit_code == 0, r.output
        saved = json.loads((out / "train_config.json").read_text())
        assert saved["config"]["loss_chunk_size"] == (None if given is None else int(given))
        assert saved["loss_chunk_size"] == want


def test_compose_synth_and_eval_save_every_flag(tmp_path, llava_teacher):
    from kd_eval.tiny import make_tiny_teacher

    llm = make_tiny_teacher(tmp_path / "llm", "causal-lm", hidden_size=32, seed=1)
    out = tmp_path / "student"
    r = runner.invoke(app, ["student", "compose", "--out", str(out), "--vision", str(llava_teacher), "--llm",
                            str(llm), "--processor-from", str(llava_teacher), "--projector-hidden-act", "relu",
                            "--vision-feature-layer", "-2", "--vision-feature-select-strategy", "full",
                            "--seed", "4", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "compose_config.json").read_text())
    assert saved == {"out": str(out), "vision": str(llava_teacher), "llm": str(llm),
                     "processor_from": str(llava_teacher), "projector_hidden_act": "relu",
                     "vision_feature_layer": -2, "vision_feature_select_strategy": "full", "seed": 4,
                     "dtype": "float32"}
    assert json.loads((out / "config.json").read_text())["projector_hidden_act"] == "relu"

    data = tmp_path / "synth"
    r = runner.invoke(app, ["data", "synth", "--out", str(data), "--n-caption", "2", "--n-train", "4", "--n-val",
                            "1", "--n-test", "6", "--image-size", "32", "--question-types", "count,colour",
                            "--multi-turn", "0.5", "--seed", "9"])
    assert r.exit_code == 0, r.output
    meta = json.loads((data / "synth.json").read_text())
    assert (meta["seed"], meta["image_size"], meta["question_types"], meta["multi_turn"]) == \
        (9, 32, ["count", "colour"], 0.5)
    assert meta["counts"] == {"caption": 2, "train": 4, "val": 1, "test": 6}

    res = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", "--model", str(llava_teacher), "--data", str(data / "instruct_test.json"),
                            "--images", str(data / "images"), "--out", str(res), "--batch-size", "3",
                            "--max-new-tokens", "2", "--limit", "4", "--device", "cpu", "--dtype", "float32",
                            "--backend", "transformers", "--quiet"])
    assert r.exit_code == 0, r.output
    saved = json.loads(res.read_text())
    assert saved["config"] == {"model": str(llava_teacher), "data": str(data / "instruct_test.json"),
                               "images": str(data / "images"), "out": str(res), "batch_size": 3,
                               "max_new_tokens": 2, "limit": 4, "device": "cpu", "dtype": "float32",
                               "backend": "transformers", "progress": False}
    assert saved["n"] + saved["skipped"]["total"] == 4


def test_train_refuses_top_k_options_on_a_sampled_cache(tmp_path, sampled_cache, llava_teacher, tiny_data):
    data, images = tiny_data
    base = ["train", "--student", str(llava_teacher), "--out", str(tmp_path / "r"), "--stage", "dft", "--cache",
            str(sampled_cache), "--data", str(data), "--images", str(images), "--max-steps", "1", "--quiet"]
    r = runner.invoke(app, base + ["--kind", "reverse_kl", "--temperature", "2"])
    assert r.exit_code == 2 and "sampled targets" in r.output and "'kind': 'reverse_kl'" in r.output, r.output
    r = runner.invoke(app, base)  # the same run with the options that apply trains
    assert r.exit_code == 0, r.output


def test_eval_refuses_an_unwritable_out_before_evaluating(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = runner.invoke(app, ["eval", "--model", "m", "--data", "d.json", "--out", str(blocker / "res.json")])
    assert r.exit_code == 2 and "folder of --out" in r.output and "is a file" in r.output, r.output
