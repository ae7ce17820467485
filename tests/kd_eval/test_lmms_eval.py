"""lmms-eval scores kd's students: `kd data synth --lmms-task` writes the test split as a local lmms-eval task, and
`lmms-eval --model llava_hf` on an exported student gets the accuracy `kd eval` gets on the same records.

The end-to-end test needs lmms-eval (marked `lmms`; scripts/test.sh runs it in .venv-vision, built by
`scripts/setup.sh vision`) and skips where it is not installed. The other tests check the task files without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kd_cache.data import Encoder, RecordSource, image_token_id_of, load_images
from kd_eval import synth
from kd_eval.evaluate import answer_score
from kd_eval.lmms_task import (TASK_NAME, aggregate_mean, doc_to_messages, doc_to_target, doc_to_text,
                               process_results, stop_mismatch, write_lmms_task)

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
TYPES = ["count", "colour", "exists", "choice", "name", "list"]  # exact match, membership and set-F1 scoring
IM_END = "<|im_end|>"


class _FunctionLoader(yaml.SafeLoader):
    """Reads lmms-eval's `!function module.name` tags as plain strings."""


_FunctionLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


@pytest.fixture(scope="module")
def synth_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    paths = synth.generate(root / "synth", n_caption=0, n_train=240, n_val=0, n_test=24, seed=3,
                           question_types=TYPES, lmms_task=root / "task")
    return paths


def test_synth_writes_a_self_contained_lmms_task(synth_task, llava_teacher):
    task = synth_task.lmms_task
    assert task is not None and (task / f"{TASK_NAME}.yaml").is_file() and (task / "utils.py").is_file()
    meta = json.loads(synth_task.meta.read_text())
    assert meta["lmms_task"] == {"folder": str(task), "task": TASK_NAME, "records": 24}
    cfg = yaml.load((task / f"{TASK_NAME}.yaml").read_text(), Loader=_FunctionLoader)
    assert cfg["task"] == TASK_NAME and cfg["dataset_kwargs"] == {"load_from_disk": True}
    assert Path(cfg["dataset_path"]) == task / "data" and cfg["test_split"] == "test"
    assert cfg["doc_to_messages"] == "!function utils.doc_to_messages"
    assert cfg["generation_kwargs"]["max_new_tokens"] == 32 and cfg["generation_kwargs"]["do_sample"] is False
    assert [m["metric"] for m in cfg["metric_list"]] == ["accuracy", "exact_match"]
    # utils.py re-exports kd's functions (what lmms-eval's `!function utils.x` imports from the task folder)
    spec = importlib.util.spec_from_file_location("utils", task / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.process_results is process_results and utils.doc_to_messages is doc_to_messages

    # the saved dataset holds the same records as the JSON split, images embedded (the image folder is not needed)
    saved, original = RecordSource(str(task / "data")), RecordSource(str(synth_task.instruct_test))
    assert len(saved) == len(original) == 24
    from kd_train.student import load_student

    model, processor = load_student(llava_teacher, dtype="float32", device="cpu")
    encoder = Encoder(processor, image_token_id_of(model.config, processor.tokenizer))
    for i in range(len(saved)):
        doc, rec = saved[i], original[i]
        assert doc["id"] == rec["id"] and doc["conversations"] == rec["conversations"]
        for key in ("valid_answers", "answer_items"):
            assert (doc.get(key) or None) == (rec.get(key) or None)
        imgs = load_images(rec, synth_task.image_root)
        assert [im.tobytes() for im in load_images(doc, None)] == [im.tobytes() for im in imgs]
        # the prompt lmms-eval's llava_hf renders (processor.apply_chat_template(doc_to_messages(doc))) is kd eval's
        want, _ = encoder.prompt(rec, imgs)
        assert processor.apply_chat_template(doc_to_messages(doc), tokenize=False, add_generation_prompt=True) == want
        assert doc_to_target(doc) == rec["conversations"][-1]["value"]
        assert "<image>" not in doc_to_text(doc) and doc_to_text(doc) in rec["conversations"][0]["value"]


def test_process_results_is_kds_score(synth_task):
    saved = RecordSource(str(synth_task.lmms_task / "data"))
    by_type = {saved[i]["question_type"]: saved[i] for i in range(len(saved))}
    for doc in by_type.values():
        ref = doc["conversations"][-1]["value"]
        for pred in (ref, f" {ref}. ", "no", "red circle", "The answer is B."):
            got = process_results(doc, [pred])
            want = answer_score(pred.strip(), ref, doc)
            assert got["accuracy"]["score"] == want and got["exact_match"]["score"] == float(want == 1.0)
            assert got["accuracy"]["id"] == doc["id"]
    list_doc = by_type["list"]
    items = list_doc["answer_items"]
    partial = process_results(list_doc, [items[0]])["accuracy"]["score"]
    assert 0 < partial < 1 or len(items) == 1  # set-F1, not exact match
    assert aggregate_mean([{"score": 1.0}, {"score": 0.5}, {"score": 0.0}]) == 0.5


def test_refusals_and_the_stop_check(tmp_path, llava_teacher):
    with pytest.raises(ValueError, match="n_test is 0"):
        synth.generate(tmp_path / "s", n_caption=0, n_train=0, n_val=0, n_test=0, lmms_task=tmp_path / "t")
    with pytest.raises(ValueError, match="task must be"):
        write_lmms_task(tmp_path / "x.json", tmp_path / "t", task="bad name")
    # kd_eval.tiny's tokenizer ends generation at <|endoftext|>, its generation config at <|im_end|> too
    problems = stop_mismatch(llava_teacher)
    assert len(problems) == 1 and "EOS" in problems[0]


# --------------------------------------------------------------------------------------------- end to end


def _student(root: Path, data: Path, images: Path) -> Path:
    """A tiny LLaVA trained 120 steps with `kd train --stage sft` (~1 min; ~40% right, answers of each question's
    form: digits, letters, yes/no, colours, lists), exported as `final/`.

    Its tokenizer's EOS is `<|im_end|>`, the generation config's only EOS id (as a Qwen2-Instruct tokenizer, whose
    EOS is the token that ends a chat turn): lmms-eval's llava_hf stops at `tokenizer.eos_token_id`, kd eval at
    the generation config's ids, and the two then stop at the same token."""
    from transformers import AutoProcessor, GenerationConfig

    from kd_eval.tiny import make_tiny_teacher
    from kd_train.train import TrainConfig, run as run_training

    init = make_tiny_teacher(root / "init", "llava", hidden_size=64, num_layers=2, image_size=64, patch_size=32,
                             corpus=synth.corpus(ambiguous=True))
    processor = AutoProcessor.from_pretrained(init)
    processor.tokenizer.eos_token = IM_END
    processor.save_pretrained(init)
    gen = GenerationConfig.from_pretrained(init)
    gen.eos_token_id = [processor.tokenizer.convert_tokens_to_ids(IM_END)]
    gen.save_pretrained(init)
    cfg = TrainConfig(student=str(init), out=str(root / "sft"), stage="sft", data=str(data), images=str(images),
                      train_vision=False, train_projector=True, train_llm=True, lr=3e-3, epochs=100, max_steps=120,
                      batch_size=8, seed=0, num_workers=0, progress=False)
    return Path(run_training(cfg)[0])


@pytest.mark.lmms
@pytest.mark.slow
@pytest.mark.skipif(not HAS_LMMS, reason="needs lmms-eval (run by scripts/test.sh in .venv-vision)")
def test_lmms_eval_gets_kd_evals_accuracy(synth_task, tmp_path):
    t0 = time.perf_counter()
    final = _student(tmp_path, synth_task.instruct_train, synth_task.image_root)
    assert stop_mismatch(final) == []
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}

    # kd eval, one record per generate call (no padding, as lmms-eval's llava_hf), on the saved dataset itself
    kd_out = tmp_path / "kd_eval.json"
    r = subprocess.run([str(bin_dir / "kd"), "eval", "--model", str(final), "--data", str(synth_task.lmms_task / "data"),
                        "--batch-size", "1", "--max-new-tokens", "32", "--device", "cpu", "--dtype", "float32",
                        "--out", str(kd_out), "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    kd = json.loads(kd_out.read_text())

    t1 = time.perf_counter()
    out = tmp_path / "lmms-out"
    cmd = [str(bin_dir / "lmms-eval"), "--model", "llava_hf",
           "--model_args", f"pretrained={final},device=cpu,device_map=cpu,dtype=float32", "--tasks", TASK_NAME,
           "--include_path", str(synth_task.lmms_task), "--batch_size", "1", "--output_path", str(out),
           "--log_samples"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    lmms_seconds = time.perf_counter() - t1
    results_files = sorted(out.rglob("*_results.json"))
    assert results_files, (list(out.rglob("*")), (r.stdout + r.stderr)[-4000:])
    results = json.loads(results_files[-1].read_text())["results"][TASK_NAME]
    samples_files = sorted(out.rglob(f"*_samples_{TASK_NAME}.jsonl"))
    assert samples_files, list(out.rglob("*"))
    samples = [json.loads(line) for line in samples_files[-1].read_text().splitlines() if line.strip()]

    # the same answers, record by record, scored the same
    kd_pred = {p["id"]: p for p in kd["predictions"]}
    lmms_pred = {s["accuracy"]["id"]: s["accuracy"] for s in samples}
    assert set(lmms_pred) == set(kd_pred) and len(kd_pred) == 24 == kd["n"]
    for rid, p in kd_pred.items():
        assert lmms_pred[rid]["prediction"] == p["prediction"], rid
        assert lmms_pred[rid]["score"] == p["score"], rid
    # the trained student answers, differently for different questions, and some answers are right
    assert len({p["prediction"] for p in kd_pred.values()}) >= 3 and 0 < kd["overall"]["accuracy"] < 1
    # the accuracy: kd sums scores per question type first, lmms-eval in record order (set-F1 scores are fractions)
    assert results["accuracy,none"] == pytest.approx(kd["overall"]["accuracy"], rel=0, abs=1e-12)
    assert results["exact_match,none"] == kd["overall"]["correct"] / kd["n"]
    print(f"\nlmms-eval accuracy {results['accuracy,none']:.6f} (exact match {results['exact_match,none']:.6f}); "
          f"kd eval accuracy {kd['overall']['accuracy']:.6f} (correct {kd['overall']['correct']}/{kd['n']}); "
          f"lmms-eval run {lmms_seconds:.1f} s, test {time.perf_counter() - t0:.1f} s")
