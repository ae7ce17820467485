"""One rank of tests/kd_train/test_fsdp.py: the DFT objective (CE, MDist on response and visual rows, RDist) through a
student sharded by FSDP2 (`fully_shard` on its decoder and vision layers, then on the `RowLogits` wrapper, the way
accelerate's FSDP plugin wraps it), one micro-batch per rank, then the gradients gathered to full tensors.

    python -m torch.distributed.run --nproc_per_node 2 tests/kd_train/fsdp_worker.py STUDENT OUT

Rank 0 saves {chunk size: {"loss": per-rank losses, "grads": {name: full gradient}, "norm": clip_grad_norm_'s total
norm}} to OUT. `make_batch` is shared with the test's single-process reference.
"""

from __future__ import annotations

import sys

import torch

from kd_cache.codec import TopKRows
from kd_train.batch import Batch
from kd_train.losses import KDLossConfig
from kd_train.objective import Objective, RowLogits, StepCounts, zero_loss
from kd_train.student import load_student

LOSS = KDLossConfig(ce_weight=1.0, mdist_text_weight=1.0, mdist_visual_weight=0.5, rdist_weight=1.0)
WRAP = ("Qwen2DecoderLayer", "SiglipEncoderLayer")  # configs/accelerate/fsdp.yaml's wrap classes
CHUNKS = (0, 4)  # the unchunked objective and the row-chunked one (the head applied outside the wrapped forward)


def prepare(folder: str):
    """The student as the DFT stage trains it: the vision tower frozen, projector and LLM trained; fp32, eval (no
    dropout), so that the sharded and the plain runs agree to float rounding."""
    torch.manual_seed(0)
    model, processor = load_student(folder)
    model.eval()
    for name, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    return model, processor


def make_batch(processor, model, seed: int) -> Batch:
    """One sample (an image and a short answer) with random top-4 teacher targets on its last 4 text rows and its
    visual rows, and a random positive semi-definite teacher Gram."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is shown {seed}?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "a red square on blue"}]}])
    color = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
    inputs = dict(processor(text=[text], images=[Image.new("RGB", (40, 40), color)], return_tensors="pt"))
    ids = inputs["input_ids"][0]
    v = model.get_output_embeddings().weight.shape[0]
    txt = torch.arange(len(ids) - 5, len(ids) - 1)
    vis = torch.nonzero(ids == model.config.image_token_id).flatten()
    rows = lambda p: torch.stack([torch.zeros_like(p), p])  # noqa: E731

    def targets(n: int) -> TopKRows:
        lp = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1)
        top, idx = lp.topk(4, dim=-1)
        return TopKRows(idx, top, torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6)), v)

    f = torch.randn(len(vis), 6, generator=g)
    return Batch(inputs, rows(txt), ids[txt + 1], rows(vis), [len(vis)], targets(len(txt)), targets(len(vis)),
                 [f @ f.T], len(ids))


def step_counts(batches: list[Batch]) -> StepCounts:
    return StepCounts(text=sum(b.n_text for b in batches), visual=sum(b.n_visual for b in batches),
                      gram=sum(b.n_gram for b in batches))


def main(folder: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = {}
        for chunk in CHUNKS:
            model, processor = prepare(folder)
            batches = [make_batch(processor, model, seed=r) for r in range(world)]
            wrapped = RowLogits(model)
            for m in model.modules():
                if type(m).__name__ in WRAP:
                    fully_shard(m)
            fully_shard(wrapped)
            objective = Objective.for_student(LOSS, model, chunk_size=chunk)  # built after wrapping, as the engine
            batch = batches[rank]
            rows = wrapped(batch.model_inputs, batch.text_rows, batch.visual_rows, logits=not objective.chunked)
            loss, _ = objective(*rows, batch, step_counts(batches), world)
            loss = loss + zero_loss(wrapped)
            loss.backward()
            grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
                     for n, p in wrapped.named_parameters() if p.requires_grad}
            norm = torch.nn.utils.clip_grad_norm_([p for p in wrapped.parameters() if p.requires_grad], 1e9)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            losses = [None] * world
            dist.all_gather_object(losses, float(loss.detach()))
            result[chunk] = {"loss": losses, "grads": grads, "norm": float(norm)}
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
