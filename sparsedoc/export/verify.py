"""Checks that an exported model is the model that was trained.

Three comparisons, all in fp32 compute with TF32 off, one unpadded sequence at a time:

* ``compare_logits``: max / mean absolute logit difference over every position of the samples;
* ``compare_greedy``: greedy continuations token for token;
* ``compare_weights``: every tensor of the reloaded folder against the in-memory export cast to
  the saved dtype, bit for bit, so a weight lost or renamed on the way to disk cannot hide behind
  a loose logit tolerance (this is what makes bf16 / fp16 exports checkable at all).
"""

from __future__ import annotations

import contextlib

import torch

EXACT_ATOL = 1e-3  # fp32 logits of an exact export vs the trained model (merge reorders sums)


@contextlib.contextmanager
def fp32_exact():
    """No TF32 while comparing: it would round matmul inputs to 10 mantissa bits on GPUs."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _logits(model, ids: list[int], virtual: int = 0) -> torch.Tensor:
    dev = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=dev), use_cache=False).logits[0]
    return out[virtual:].float().cpu()


@torch.no_grad()
def compare_logits(reference, exported, samples: list[list[int]], ref_virtual: int = 0) -> dict:
    """``ref_virtual``: soft-prompt positions the reference prepends (prompt tuning)."""
    with fp32_exact():
        max_d, sum_d, n, scale = 0.0, 0.0, 0, 0.0
        for ids in samples:
            a, b = _logits(reference, ids, ref_virtual), _logits(exported, ids)
            d = (a - b).abs()
            max_d, sum_d, n = max(max_d, float(d.max())), sum_d + float(d.sum()), n + d.numel()
            scale = max(scale, float(a.abs().max()))
    return {"max_abs_logit_diff": max_d, "mean_abs_logit_diff": sum_d / max(n, 1),
            "max_abs_logit": scale, "samples": len(samples),
            "tokens": sum(len(s) for s in samples)}


@torch.no_grad()
def greedy_tokens(model, tokenizer, prompts: list[list[int]], max_new_tokens: int
                  ) -> list[list[int]]:
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs = []
    with fp32_exact():
        for ids in prompts:
            x = torch.tensor([ids], device=dev)
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=max_new_tokens, pad_token_id=pad)
            outs.append(y[0, len(ids):].tolist())
    return outs


def compare_greedy(reference, exported, tokenizer, prompts: list[list[int]],
                   max_new_tokens: int) -> dict:
    a = greedy_tokens(reference, tokenizer, prompts, max_new_tokens)
    b = greedy_tokens(exported, tokenizer, prompts, max_new_tokens)
    same = [x == y for x, y in zip(a, b)]
    first_diff = next((i for i, s in enumerate(same) if not s), None)
    out = {"greedy_match": all(same), "greedy_prompts_matching": sum(same),
           "greedy_prompts": len(prompts), "greedy_new_tokens": max_new_tokens}
    if first_diff is not None:
        out["greedy_first_mismatch"] = {"prompt": first_diff, "reference": a[first_diff],
                                        "exported": b[first_diff]}
    return out


@torch.no_grad()
def compare_weights(in_memory, reloaded, dtype: torch.dtype) -> dict:
    """Bitwise comparison of every parameter and persistent buffer after the dtype cast."""
    mine, theirs = in_memory.state_dict(), reloaded.state_dict()
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    differ = [k for k in sorted(set(mine) & set(theirs))
              if not torch.equal(mine[k].to(dtype).cpu(), theirs[k].to(dtype).cpu())]
    return {"weights_equal": not (missing or extra or differ), "tensors": len(mine),
            "missing": missing[:10], "unexpected": extra[:10], "different": differ[:10]}
