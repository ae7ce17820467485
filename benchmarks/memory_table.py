"""Memory of a DFT step for Qwen-shaped students: weights, gradients, optimizer state and activations,
full fine-tuning vs LoRA, with and without gradient checkpointing and the row-chunked objective, at micro-batch
1 / 4 / 8, and which cards they fit.

    python -m benchmarks.memory_table            # ~1 minute on 2 CPU cores; writes the table into docs/training.md

How each figure is obtained (also printed under the table):
* parameter counts: exact, from the transformers Qwen2 model of each shape built on the meta device (no memory);
* weights / gradients / AdamW state: bytes per parameter of kd's training (accelerate mixed precision keeps fp32
  master weights: 4 B weights, 4 B gradients, 8 B AdamW moments per trainable parameter; frozen parameters 4 B);
* activations of the LLM: measured on CPU in fp32 at reduced depth (1 and 2 decoder layers of the real width, one
  sequence of SEQ tokens): the bytes of the tensors autograd saves for backward (deduplicated by storage), per
  layer from the 2-layer minus 1-layer difference, extrapolated to the full depth and linearly in the batch. With
  checkpointing: the saved bytes measured with it on, plus one layer's activations recomputed in backward;
* activations of the loss: the measurement of benchmarks/chunked_loss.py (docs/benchmarks.md) per logit row:
  unchunked ~6 fp32 (rows, V) buffers per row, chunked one chunk of them (96 rows), for ROWS loss rows;
* not counted: the frozen vision tower's activations (no gradient flows into it), CUDA context and allocator
  fragmentation (add ~1-2 GB on a real card), the teacher (none: kd trains from the cache).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kd_eval import report  # noqa: E402

SEQ = 800  # tokens per sample: 576 visual (LLaVA-1.5 at 336 px) + ~150 answer + prompt
ROWS = 726  # loss rows per sample: 576 visual + 150 response
VOCAB = 151936
VISION_PARAMS = 303_507_456  # CLIP ViT-L/14-336 (LLaVA-1.5's tower), frozen
CHUNK = 96
GB = 1024 ** 3
# Qwen-shaped students (the paper's 0.5B and 1.8B, and a 4B): Qwen2 / Qwen1.5 configurations
SHAPES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.8B": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, tie_word_embeddings=False),
    "4B": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=40, num_attention_heads=20,
               num_key_value_heads=20, tie_word_embeddings=False),
}
LORA_R = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CARDS = (16, 24, 48, 80)
MARK = ("<!-- memory_table -->", "<!-- /memory_table -->")


def config(shape: str, layers: int | None = None, vocab: int = VOCAB):
    from transformers import Qwen2Config

    kw = dict(SHAPES[shape])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return Qwen2Config(vocab_size=vocab, max_position_embeddings=4096, attn_implementation="sdpa", **kw)


def counts(shape: str) -> dict[str, int]:
    """Exact parameter counts of the LLM, its LoRA adapters, and the projector (LLaVA 2-layer MLP, 1024 -> D)."""
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        m = Qwen2ForCausalLM(config(shape))
    llm = sum(p.numel() for p in m.parameters())  # tied embeddings counted once
    lora = sum(LORA_R * (mod.in_features + mod.out_features) for name, mod in m.named_modules()
               if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in LORA_TARGETS)
    d = SHAPES[shape]["hidden_size"]
    projector = 1024 * d + d + d * d + d
    return {"llm": llm, "lora": lora, "projector": projector, "vision": VISION_PARAMS}


def saved_bytes(shape: str, layers: int, checkpointing: bool) -> int:
    """Bytes autograd saves for backward in one fwd of `layers` decoder layers over one SEQ-token sequence (fp32)."""
    from transformers import Qwen2Model

    torch.manual_seed(0)
    model = Qwen2Model(config(shape, layers, vocab=16)).train()
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    x = torch.randn(1, SEQ, SHAPES[shape]["hidden_size"], requires_grad=True)  # the projector's output etc.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() != x.untyped_storage().data_ptr():
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inputs_embeds=x, use_cache=False).last_hidden_state
    out.float().pow(2).mean().backward()
    return sum(seen.values())


def activations(shape: str) -> dict[str, float]:
    """Per-sample LLM activation bytes for the full depth, without and with checkpointing."""
    n = SHAPES[shape]["num_hidden_layers"]
    out = {}
    for ckpt in (False, True):
        one, two = saved_bytes(shape, 1, ckpt), saved_bytes(shape, 2, ckpt)
        per_layer, base = two - one, 2 * one - two
        out["ckpt" if ckpt else "plain"] = base + n * per_layer
        out[("ckpt" if ckpt else "plain") + "_per_layer"] = per_layer
    out["ckpt"] += out["plain_per_layer"]  # one layer's activations are rebuilt at a time in backward
    return out


def loss_activations(chunked: bool, batch: int) -> float:
    """fp32 bytes of the loss's logits buffers (benchmarks/chunked_loss.py: ~6 (rows, V) buffers per row)."""
    rows = CHUNK if chunked else ROWS * batch
    return 6 * rows * VOCAB * 4


def table(measured: dict) -> list[dict]:
    rows = []
    for shape in SHAPES:
        c, act = measured[shape]["counts"], measured[shape]["activations"]
        for lora in (False, True):
            trainable = c["projector"] + (c["lora"] if lora else c["llm"])
            frozen = c["vision"] + (c["llm"] if lora else 0)
            states = {"weights": 4 * (trainable + frozen),
                      "grads": 4 * trainable, "adam": 8 * trainable}
            for ckpt in (False, True):
                for chunked in (False, True):
                    r = {"student": shape, "mode": "LoRA r=16" if lora else "full", "checkpointing": ckpt,
                         "chunked": chunked, **{k: v / GB for k, v in states.items()}}
                    for b in (1, 4, 8):
                        total = sum(states.values()) + b * act["ckpt" if ckpt else "plain"] + loss_activations(chunked, b)
                        r[f"act_b{b}"] = (b * act["ckpt" if ckpt else "plain"] + loss_activations(chunked, b)) / GB
                        r[f"total_b{b}"] = total / GB
                    rows.append(r)
    return rows


def fits(total: float) -> str:
    ok = [c for c in CARDS if total <= c * 0.92]  # ~8 % for the CUDA context and the allocator
    return f"{ok[0]} GB" if ok else "> 80 GB"


def markdown(payload: dict) -> str:
    lines = [MARK[0], "### Memory of a DFT step by student size (`python -m benchmarks.memory_table`)", "",
             f"{payload['date']}, {payload['machine']} ({payload['seconds']:.0f} s). One sample = {SEQ} tokens, "
             f"{ROWS} loss rows (576 visual + 150 response), V = {VOCAB}; AdamW; fp32 master weights (kd's mixed "
             "precision); the frozen CLIP-L/336 tower counted as weights. GB = 2³⁰ bytes. *fits*: the smallest card "
             "of 16 / 24 / 48 / 80 GB with 8 % to spare.", "",
             "| student | mode | ckpt | chunked loss | weights | grads | AdamW | act. b=1 | act. b=4 | act. b=8 | "
             "total b=1 | fits | total b=4 | fits | total b=8 | fits |", "|---|---|---|---|" + "---:|" * 12]
    for r in payload["rows"]:
        lines.append(f"| {r['student']} | {r['mode']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{'yes' if r['chunked'] else 'no'} | {r['weights']:.1f} | {r['grads']:.1f} | {r['adam']:.1f} | "
                     f"{r['act_b1']:.1f} | {r['act_b4']:.1f} | {r['act_b8']:.1f} | {r['total_b1']:.1f} | "
                     f"{fits(r['total_b1'])} | {r['total_b4']:.1f} | {fits(r['total_b4'])} | {r['total_b8']:.1f} | "
                     f"{fits(r['total_b8'])} |")
    lines += ["", "Measured per layer (fp32, one sample): " + "; ".join(
        f"{s}: {m['activations']['plain_per_layer'] / 2**20:.0f} MB without checkpointing, "
        f"{m['activations']['ckpt_per_layer'] / 2**20:.1f} MB with" for s, m in payload["measured"].items()) + ".",
        "", "How each figure was obtained: parameter counts exact (meta-device models); weights, gradients and AdamW "
        "state from bytes per parameter; LLM activations measured on CPU in fp32 at 1 and 2 layers of the real width "
        "(bytes autograd saves for backward) and extrapolated per layer to the full depth and linearly in the batch "
        "(bf16 autocast on a GPU saves most of them in half the bytes, so these are upper bounds); loss activations "
        "from benchmarks/chunked_loss.py's measurement (~6 fp32 (rows, V) buffers per row; one 96-row chunk when "
        "chunked). Not measured on a GPU (none was lent to this task).", MARK[1]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "memory_table.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "training.md"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    measured = {s: {"counts": counts(s), "activations": activations(s)} for s in SHAPES}
    payload = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": report.machine_description(), "measured": measured, "rows": table(measured)}
    payload["seconds"] = time.perf_counter() - t0
    report.publish_benchmark(payload, args.results, args.docs, MARK, markdown(payload))


if __name__ == "__main__":
    main()
