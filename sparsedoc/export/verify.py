"""Checks that an exported model is the model that was trained.

Three comparisons, all in fp32 compute with TF32 off, one unpadded sequence at a time:

* ``logit_diff``: max / mean absolute logit difference over every position of the samples;
* ``greedy_diff``: greedy continuations token for token;
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


@torch.no_grad()
def logits_of(model, samples: list) -> list[torch.Tensor]:
    """fp32 CPU logits of each sample, one unpadded sequence at a time, TF32 off. A decoder's
    sample is its ids; an encoder-decoder's is ``(source ids, decoder input ids)``, the logits
    those of the decoder positions."""
    dev = next(model.parameters()).device

    def forward(sample):
        if isinstance(sample, tuple):
            source, decoder = sample
            return model(input_ids=torch.tensor([source], device=dev),
                         decoder_input_ids=torch.tensor([decoder], device=dev), use_cache=False)
        return model(input_ids=torch.tensor([sample], device=dev), use_cache=False)

    with fp32_exact():
        return [forward(s).logits[0].float().cpu() for s in samples]


def logit_diff(expected: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    d = [(a - b).abs() for a, b in zip(expected, got)]
    return {"max_abs_logit_diff": max(float(x.max()) for x in d),
            "mean_abs_logit_diff": sum(float(x.sum()) for x in d) / sum(x.numel() for x in d)}


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
            # a decoder's output repeats the prompt; an encoder-decoder's is the decoder's alone
            new = y[0] if model.config.is_encoder_decoder else y[0, len(ids):]
            outs.append(new.tolist())
    return outs


def greedy_diff(expected: list[list[int]], got: list[list[int]]) -> dict:
    same = [a == b for a, b in zip(expected, got)]
    out = {"greedy_match": all(same), "greedy_prompts_matching": sum(same),
           "greedy_prompts": len(same)}
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is not None:
        out["greedy_first_mismatch"] = {"prompt": first, "expected": expected[first],
                                        "got": got[first]}
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
