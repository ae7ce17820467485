"""FSDP2 (accelerate's `fsdp_version: 2`, configs/accelerate/fsdp.yaml): the objective's gradients through a sharded
student equal the unsharded ones. Accelerate runs FSDP only on GPUs, so this shards with torch's own `fully_shard`
over gloo on the CPU, as accelerate's plugin does (the wrap classes, then the `RowLogits` wrapper).

Found on a GPU (benchmarks/gpu_check.py): RDist's student Gram read the LM head's weight captured when the objective
was built, a sharded DTensor by the time the loss ran ("aten.mm.default got mixed torch.Tensor and DTensor").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import launcher_env, run_in_group
from tests.kd_train.fsdp_worker import CHUNKS, LOSS, make_batch, prepare, step_counts
from kd_train.objective import Objective, RowLogits, zero_loss

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fsdp2_sharded_student_gets_the_unsharded_gradients(tmp_path, llava_teacher):
    out = tmp_path / "fsdp.pt"
    env = launcher_env(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests/kd_train/fsdp_worker.py"), str(llava_teacher), str(out)]
    r = run_in_group(cmd, env=env, timeout=300, cwd=str(REPO))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    sharded = torch.load(out)
    assert set(sharded) == set(CHUNKS)

    for chunk in CHUNKS:
        model, processor = prepare(str(llava_teacher))
        batches = [make_batch(processor, model, seed=r) for r in range(2)]
        wrapped = RowLogits(model)
        objective = Objective.for_student(LOSS, model, chunk_size=chunk)
        counts = step_counts(batches)
        losses = []
        for b in batches:  # both ranks' micro-batches in one process: the step's per-row mean, world size 1
            rows = wrapped(b.model_inputs, b.text_rows, b.visual_rows, logits=not objective.chunked)
            loss, parts = objective(*rows, b, counts, 1)
            assert parts["rdist"] > 0 and parts["mdist_visual"] > 0  # every term of the DFT objective is exercised
            (loss + zero_loss(wrapped)).backward()
            losses.append(float(loss.detach()))
        got = sharded[chunk]
        # each rank's loss is scaled by the world size (FSDP averages gradients): half of it is this micro-batch's
        assert got["loss"] == pytest.approx([2 * x for x in losses], rel=1e-5)
        want = {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
        assert set(got["grads"]) == set(want) and any("projector" in n for n in want)
        for name, g in want.items():
            scale = g.abs().max().item() + 1e-12
            assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-5 * scale), (chunk, name)
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want.values()]))
        assert got["norm"] == pytest.approx(float(norm), rel=1e-5)


def test_a_sharded_run_trains_on_the_micro_batches_every_rank_runs_alike():
    """Under FSDP / ZeRO-3 a micro-batch held by only some ranks, or with images on only some (the vision tower runs
    only there), would leave the other ranks out of a weight gather: every rank skips it alike."""
    from kd_train.engine import sharded_slots

    per = torch.tensor([[4, 10, 1, 50, 2, 2, 2],  # both ranks, both with images
                        [3, 0, 0, 20, 2, 0, 2],  # both ranks, text only
                        [3, 5, 1, 30, 2, 1, 2],  # images on one rank only
                        [2, 0, 0, 10, 1, 0, 1],  # one rank's micro-batch was skipped entirely
                        [0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)  # none
    assert sharded_slots(per, 2) == [True, True, False, False, False]
    assert sharded_slots(per[:1], 4) == [False]


def test_which_runs_are_sharded():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from kd_train.engine import shards_parameters

    def acc(kind, n=2, stage=None):
        plugin = None if stage is None else SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(num_processes=n, distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))

    assert shards_parameters(acc(DistributedType.FSDP))
    assert shards_parameters(acc(DistributedType.DEEPSPEED, stage=3))
    assert not shards_parameters(acc(DistributedType.DEEPSPEED, stage=2))
    assert not shards_parameters(acc(DistributedType.MULTI_GPU))
    assert not shards_parameters(acc(DistributedType.FSDP, n=1))  # no peer to wait for


@pytest.mark.slow
def test_micro_batches_not_every_rank_runs_alike_are_dropped_on_every_rank(tmp_path, llava_teacher, tiny_data):
    """The engine's sharded-run rule through `kd train` on 2 gloo ranks: DDP stands in for FSDP (accelerate runs
    FSDP on GPUs only) with `shards_parameters` answering yes. Shard A holds 4 image records, shard B alternates
    text-only and image records, one shard per rank: micro-batches 0 and 2 have an image on one rank only, so both
    ranks drop them (4 samples, counted), train on 1 and 3, and end."""
    import json

    from kd_cache.build import BuildConfig, build
    from tests.conftest import write_records

    data, images = tiny_data
    pictures = [r for r in json.loads(Path(data).read_text()) if r.get("image")][:6]
    text_only = [{"id": f"text-{i}", "conversations": [{"from": "human", "value": f"Say the number {i}."},
                                                       {"from": "gpt", "value": f"{i}"}]} for i in range(2)]
    records = pictures[:4] + [text_only[0], pictures[4], text_only[1], pictures[5]]
    path = write_records(tmp_path / "d", records)
    cache = tmp_path / "cache"
    build(BuildConfig(teacher=str(llava_teacher), data=str(path), images=str(images), out=str(cache), shard_size=4,
                      progress=False))
    launcher = tmp_path / "kd_sharded.py"
    launcher.write_text("import sys\nimport kd_train.engine as engine\n"
                        "engine.shards_parameters = lambda acc: acc.num_processes > 1\n"
                        "from kd_cli.main import main\nsys.exit(main())\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(launcher), "train",
           "--stage", "dpt", "--student", str(llava_teacher), "--cache", str(cache), "--data", str(path), "--images",
           str(images), "--out", str(out), "--batch-size", "1", "--shuffle-buffer", "0", "--quiet"]
    r = run_in_group(cmd, env=launcher_env(KD_DIST_TIMEOUT="180", PYTHONPATH=str(REPO)), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    stage = json.loads((out / "final" / "kd_stage.json").read_text())
    assert stage["data_stats"]["dropped_to_keep_shards_in_step"] == 4
    assert stage["steps"] == 2
    assert r.stderr.count("dropped on every rank") >= 2  # micro-batches 0 and 2, said by each rank that logs
