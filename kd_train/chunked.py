"""Row-chunked LM head + loss: a loss over the logits of N rows without ever holding (N, V) logits.

Applied to all rows at once, the head materialises the student's logits at every supervised row in fp32, plus
their log-softmax and gradients: at LLaVA scale (576 visual + 150 response rows, V = 152K) several GB.  Here the
head is applied to one chunk of rows at a time and the chunk's gradients w.r.t. the hidden states, the head weight
and bias are taken right away (inside the forward, Liger / TRL style), so at most one chunk of (rows, V) logits and
their gradients is alive.  Backward only scales the stored gradients by the incoming gradient.

Here: `chunked_row_loss` (`(hidden (N, D), head, fn) -> (loss, term sums)`, differentiable w.r.t. `hidden` and the
head's weight / bias), `RowTerms` (a loss made of named sums over rows, the form `fn` takes) and `concat_row_fns`
(several row sets in one pass).  What the terms are is the objective's (`kd_train/objective.py`): it builds one
`RowTerms` per row set and calls it once over all rows (unchunked) or here, chunk by chunk; the terms are sums over
rows (`reduction="sum"`), so chunk sums add up to the sums over all rows and values and gradients equal the
unchunked path's up to float rounding.

Memory: O(chunk_size · V) for the chunk's logits, the losses' intermediates and their gradients, plus gradient
buffers the size of `hidden` and of the weight (fp32 when the weight is bf16/fp16) that are handed to autograd in
backward (they become `weight.grad`, no copy when it was None).  Nothing is computed at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kd_train.config import DEFAULT_LOSS_CHUNK_SIZE

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "RowLossFn",
    "RowTerms",
    "chunked_row_loss",
    "concat_row_fns",
]

# Rows per chunk by default, from benchmarks/chunked_loss.py (docs/benchmarks.md, "Chunked KD loss"): at Nv = 576,
# Nt = 150, V = 152K, D = 896 (fp32, CPU) 96 rows is the largest measured size whose loss activation memory is
# <= 1/4 of the unchunked path's (0.23x; 128 rows: 0.31x) at no step-time cost.  The activation memory is about
# 6 (rows, V) fp32 buffers per chunk row, so it scales linearly with the chunk.
DEFAULT_CHUNK_SIZE: int = DEFAULT_LOSS_CHUNK_SIZE  # one definition: kd_train/config.py (why 96)

RowLossFn = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, Mapping[str, Union[float, torch.Tensor]]]]
"""`fn(logits (n, V) float32, start, end) -> (scalar loss of rows start:end, {term: sum over those rows})`.
The term values may be floats or 0-dim tensors (tensors avoid a device sync per chunk)."""


# --------------------------------------------------------------------------------------
# the autograd function
# --------------------------------------------------------------------------------------


def _amp_context(device_type: str, amp_dtype: torch.dtype | None):
    """The autocast state under which the unchunked path applies the head and the logit transform."""
    if amp_dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=amp_dtype)


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over row chunks of fn(transform(hidden[s:e] @ Wᵀ + b).float(), s, e); gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, fn, chunk_size, transform, amp_dtype, terms_out):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        dev = hidden.device.type
        # the head's matmul dtype: autocast's (bf16/fp16) or the inputs' own, as nn.Linear would run it
        cdtype = amp_dtype if amp_dtype is not None else hidden.dtype
        h_all = hidden.detach()
        w = weight.detach().to(cdtype)  # one cast for all chunks (autocast would cast once per region too)
        b = None if bias is None else bias.detach().to(cdtype)
        # Weight/bias gradients are sums over chunks: accumulate them in at least fp32 (a bf16 running sum would
        # round at every chunk; the unchunked path rounds its bf16 GEMM once).
        acc_w = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.zeros(h_all.shape, dtype=h_all.dtype, device=h_all.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_w, device=weight.device) if need_w else None
        grad_b = None
        if need_b:
            grad_b = torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, torch.float32),
                                 device=bias.device)
        total = None
        # N = 0 still calls fn once, on an empty chunk, so that it reports its terms (as zeros)
        starts = range(0, n, chunk_size) if n else (0,)
        with torch.autocast(dev, enabled=False):
            for s in starts:
                e = min(s + chunk_size, n)
                h = h_all[s:e].to(cdtype)
                # logits as a leaf of the chunk's own small graph: autograd only runs transform + loss, and the
                # head's two matmuls are done by hand below, in place into the buffers
                z_lin = F.linear(h, w, b).requires_grad_(True)
                with torch.enable_grad():
                    with _amp_context(dev, amp_dtype):
                        z = transform(z_lin) if transform is not None else z_lin
                    # the unchunked path upcasts with zt.float() before the losses (float64 stays float64)
                    zf = z if z.dtype == torch.float64 else z.float()
                    out = fn(zf, s, e)
                    loss, terms = _check_fn_output(out)
                g_z = None
                if loss.requires_grad:
                    (g_z,) = torch.autograd.grad(loss, z_lin, allow_unused=True)
                if g_z is not None:
                    if grad_h is not None:
                        if grad_h.dtype == g_z.dtype:
                            torch.mm(g_z, w, out=grad_h[s:e])
                        else:
                            grad_h[s:e] = g_z @ w  # cast back to hidden's dtype, as autocast's backward does
                    if grad_w is not None:
                        if grad_w.dtype == g_z.dtype:
                            grad_w.addmm_(g_z.t(), h)
                        else:  # bf16 product (as the unchunked GEMM), summed in fp32
                            grad_w.add_(g_z.t() @ h)
                    if grad_b is not None:
                        grad_b.add_(g_z.sum(0))
                part = loss.detach()
                total = part if total is None else total + part
                for name, value in terms.items():
                    v = value.detach() if isinstance(value, torch.Tensor) else float(value)
                    terms_out[name] = terms_out[name] + v if name in terms_out else v
                # free this chunk before the next one is built
                del z_lin, z, zf, out, loss, g_z, h
        # buffers are intermediates, not inputs/outputs: kept on ctx (not save_for_backward) so that backward
        # can drop its reference and autograd can adopt the buffer as .grad without a copy
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("chunked_row_loss supports one backward per forward (its gradients are computed "
                               "in forward and handed over once), got a second backward (retain_graph=True?)")
        grads, ctx.grads = ctx.grads, None
        scale = None if bool(grad_out == 1) else grad_out
        out = []
        for g, dtype in zip(grads, ctx.dtypes):
            if g is not None:
                if scale is not None:
                    g.mul_(scale.to(g.dtype))  # in place: the buffer is ours and no longer referenced by ctx
                if g.dtype != dtype:
                    g = g.to(dtype)
            out.append(g)
        return (*out, None, None, None, None, None)


def _check_fn_output(out: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"fn must return a (scalar loss tensor, dict of term sums) pair, got {type(out).__name__}")
    loss, terms = out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"fn's loss must be a 0-dim floating tensor, got {shape}")
    if not isinstance(terms, Mapping):
        raise ValueError(f"fn's term sums must be a mapping, got {type(terms).__name__}")
    return loss, terms


def chunked_row_loss(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    fn: RowLossFn,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp_dtype: torch.dtype | str | None = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of the head's logits at N rows, computed chunk by chunk: never more than `chunk_size` rows of logits.

    Equals, in value and in gradients w.r.t. `hidden`, `head.weight` and `head.bias` (up to rounding):

        z = head(hidden)                      # under autocast when amp_dtype is set
        z = transform(z) if transform else z  # same autocast state
        loss, terms = fn(z.float(), 0, N)     # autocast off, as the losses run in the engine

    because `fn` is additive over rows (sums): it is called on consecutive chunks `fn(z[s:e], s, e)` and the chunk
    losses and term sums are added.  Each chunk's gradients are taken immediately (`torch.autograd.grad`) and
    accumulated; backward hands them to autograd scaled by the incoming gradient.  A head parameter with
    `requires_grad=False` (frozen head) gets no buffer and no gradient.

    Args:
        hidden: (N, D) final hidden states at the rows (after the final norm), usually requiring grad.  N = 0 is
            allowed (`fn` is then called once on a (0, V) chunk so it reports its terms).
        head: the LM head, applied as `F.linear(h, head.weight, head.bias)`: an `nn.Linear` (V, D) weight and
            optional (V,) bias.  Heads whose forward does more (LoRA on the head, quantised linears, hooks that
            change the output) are not reproduced.
        fn: per-chunk loss, `fn(logits (n, V) float32, start, end) -> (scalar sum over the rows, {term: sum})`; it
            must be a sum over rows (any `reduction="sum"` loss of `kd_train.losses`), e.g. a `RowTerms` (the
            objective's are built by `kd_train.objective.text_rows_fn` / `visual_rows_fn`).  An `n_rows`
            attribute, when present, is checked against N.
        chunk_size: rows per chunk (>= 1); `DEFAULT_CHUNK_SIZE` by default.
        transform: the model's logit transform (`kd_cache.hf.logit_transform`), applied to the head's output
            before the loss.
        amp_dtype: dtype of the head's matmul and the transform.  "auto" (default) takes the autocast dtype when
            autocast is enabled for `hidden`'s device at the call, as the unchunked `head(h)` would run; None runs
            in the inputs' dtype; a dtype (e.g. `torch.bfloat16`) forces that autocast, which lets the caller
            compute the loss outside the autocast region and still match a head run inside it.

    Returns:
        `(loss, terms)`: a 0-dim tensor (float32 for float32/bf16 logits) differentiable w.r.t. `hidden` and the
        head's parameters, and the per-term sums over all rows as floats.  The graph supports one backward.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a 2-D (N, D) floating tensor, got {shape}")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"head.weight must be a (V, D={hidden.shape[1]}) tensor, got {got}")
    bias = getattr(head, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"head.bias must be None or a (V={weight.shape[0]},) tensor, got {got}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if transform is not None and not callable(transform):
        raise ValueError(f"transform must be None or callable, got {type(transform).__name__}")
    expected = getattr(fn, "n_rows", None)
    if expected is not None and expected != hidden.shape[0]:
        raise ValueError(f"fn covers {expected} rows but hidden has N={hidden.shape[0]} rows, got mismatched inputs")
    dev = hidden.device.type
    if isinstance(amp_dtype, str):
        if amp_dtype != "auto":
            raise ValueError(f"amp_dtype must be 'auto', None or a torch.dtype, got {amp_dtype!r}")
        amp_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    elif amp_dtype is not None and (not isinstance(amp_dtype, torch.dtype) or not amp_dtype.is_floating_point):
        raise ValueError(f"amp_dtype must be 'auto', None or a floating torch.dtype, got {amp_dtype!r}")
    if amp_dtype is None and weight.dtype != hidden.dtype:
        raise ValueError(f"outside autocast hidden and head.weight must share a dtype, got {hidden.dtype} and "
                         f"{weight.dtype}")
    terms: dict[str, Any] = {}
    loss = _ChunkedHeadLoss.apply(hidden, weight, bias, fn, chunk_size, transform, amp_dtype, terms)
    return loss, {name: float(v) for name, v in terms.items()}


# --------------------------------------------------------------------------------------
# per-chunk loss functions
# --------------------------------------------------------------------------------------


class RowTerms:
    """A `RowLossFn` made of named sums over rows: `loss = sum_t scale_t * term_t(z, s, e)`, reporting each
    `term_t` (detached) under its name.

    `terms`: (name, scale, term) triples, `term(logits of rows s:e, s, e) -> 0-dim sum over those rows`. `n_rows`:
    the rows the terms cover (`chunked_row_loss` checks it); `names`: the terms it reports, in order.
    """

    def __init__(self, n_rows: int,
                 terms: Sequence[tuple[str, float, Callable[[torch.Tensor, int, int], torch.Tensor]]]):
        self.n_rows = int(n_rows)
        self._terms = list(terms)
        self.names = tuple(name for name, _, _ in self._terms)

    def __call__(self, z: torch.Tensor, start: int, end: int):
        loss = None
        sums: dict[str, torch.Tensor] = {}
        for name, scale, term in self._terms:
            value = term(z, start, end)
            sums[name] = value.detach()
            loss = scale * value if loss is None else loss + scale * value
        if loss is None:  # no term on these rows: a zero that keeps the caller's types
            loss = z.new_zeros(())
        return loss, sums


def concat_row_fns(*parts: RowTerms | tuple[int, RowLossFn]) -> RowTerms:
    """One `RowLossFn` over row sets stacked one after the other (`torch.cat` of their hidden states).

    `parts`: `RowTerms` (their `n_rows` is used) or `(n_rows, fn)` pairs, in row order.  One pass over the
    concatenation shares one weight-gradient buffer (one call per row set would hold one each until backward) and
    fills every chunk.  A chunk that straddles two row sets calls each on its part, with row indices local to that
    set; a row set with no rows is called once, on an empty slice of the first chunk, so that its terms are
    reported (as zeros) as they are when the set is called on all its rows at once.
    """
    spans = []
    start = 0
    for p in parts:
        n, f = (p.n_rows, p) if isinstance(p, RowTerms) else p
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not callable(f):
            raise ValueError(f"parts must be RowTerms or (n_rows >= 0, fn) pairs, got {p!r}")
        spans.append((start, start + n, f))
        start += n

    def fn(z: torch.Tensor, s: int, e: int):
        loss = None
        sums: dict[str, Any] = {}
        for a, b, f in spans:
            if a == b:  # no rows: report its terms once, on the first chunk
                if s != 0:
                    continue
                out = f(z[:0], 0, 0)
            else:
                lo, hi = max(a, s), min(b, e)
                if lo >= hi:
                    continue
                out = f(z[lo - s:hi - s], lo - a, hi - a)
            part_loss, part_sums = _check_fn_output(out)
            loss = part_loss if loss is None else loss + part_loss
            for name, v in part_sums.items():
                sums[name] = sums[name] + v if name in sums else v
        return (z.new_zeros(()) if loss is None else loss), sums

    names = tuple(n for p in parts if isinstance(p, RowTerms) for n in p.names)
    return _Concat(start, fn, names)


class _Concat(RowTerms):
    def __init__(self, n_rows: int, fn: RowLossFn, names: tuple[str, ...]):
        super().__init__(n_rows, [])
        self._fn = fn
        self.names = names

    def __call__(self, z: torch.Tensor, start: int, end: int):
        return self._fn(z, start, end)
