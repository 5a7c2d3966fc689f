"""``sparsedoc generate`` and ``sparsedoc chat``: talk to any model sparsedoc can load.

MODEL is whatever ``sparsedoc.loader.load_trained`` accepts (a training run, checkpoint,
adapter or HF folder, a hub id, ``embedded``), so a run is tried the way it will be scored.
Prompts go through the tokenizer's own chat template, as in training and evaluation
(``sparsedoc.eval.prompts``), so a fine-tuned model sees the framing it learned; a tokenizer
without a template gets the evaluation's plain format (turn texts, blank-line separated).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsedoc.errors import UserError
from sparsedoc.eval.prompts import encode, prompt_budget, render_chat

_PROBE = "sparsedoc-end-of-turn-probe"


@dataclass
class GenerationOptions:
    """Decoding settings. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


def build_chat_inputs(tokenizer, messages: list[dict]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of shape (1, T): ``messages`` rendered up to the
    assistant header, exactly as evaluation renders them."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        text = render_chat(tokenizer, messages)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    ids = torch.tensor([encode(tokenizer, text, chat)], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with (``<|im_end|>``, Llama-3's
    ``<|eot_id|>``, Gemma's ``<end_of_turn>``). Often it is not EOS, and without it a reply runs
    on into a made-up next turn. Found by rendering a probe reply and reading what follows."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except (TemplateError, ValueError):  # strict role rules may reject the probe: EOS only then
        return None
    _, found, tail = text.partition(_PROBE)
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if found else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS of the model and the tokenizer, plus the chat template's end-of-turn token."""
    ids: list = []
    for eos in (model.generation_config.eos_token_id, tokenizer.eos_token_id,
                _end_of_turn_id(tokenizer)):
        ids += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return sorted({i for i in ids if i is not None})


@torch.no_grad()
def generate_reply(model, tokenizer, messages: list[dict], opts: GenerationOptions,
                   streamer=None) -> str:
    """The model's reply to ``messages`` (decoded, special tokens dropped, stripped).

    The seed is set on every call, so a reply does not depend on what was generated before it.
    A prompt longer than the model's context (less ``max_new_tokens``) loses its left end, as in
    evaluation, with a warning on stderr.
    """
    from transformers import set_seed

    from sparsedoc.eval.generation import generation_config

    inputs = build_chat_inputs(tokenizer, messages)
    budget = prompt_budget(model, 0, opts.max_new_tokens)
    if inputs["input_ids"].shape[1] > budget:
        print(f"warning: prompt of {inputs['input_ids'].shape[1]} tokens cut to its last "
              f"{budget}", file=sys.stderr)
        inputs = {k: v[:, -budget:] for k, v in inputs.items()}
    gc = generation_config(model, tokenizer, opts.max_new_tokens,
                           greedy=opts.temperature == 0)
    if opts.temperature > 0:
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = (True, opts.temperature, opts.top_p,
                                                            opts.top_k)
    stops = stop_token_ids(model, tokenizer)
    gc.eos_token_id = stops
    if gc.pad_token_id is None:
        gc.pad_token_id = stops[0]
    set_seed(opts.seed)
    dev = next(model.parameters()).device
    out = model.generate(**{k: v.to(dev) for k, v in inputs.items()}, generation_config=gc,
                         streamer=streamer)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    end = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:end], skip_special_tokens=True).strip()


def _streamer(tokenizer):
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# ---- command line -----------------------------------------------------------------------------


def load_model(path: str, dtype: str, device: str, trust_remote_code: bool = False):
    """``sparsedoc.loader.load_trained``, after checking that ``cuda`` is there."""
    from sparsedoc.loader import load_trained

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is visible")
    model, tokenizer, loaded = load_trained(path, dtype, device, trust_remote_code)
    print(f"loaded {loaded.name} ({loaded.kind}, {loaded.method}) on {loaded.device}, "
          f"{loaded.dtype}", file=sys.stderr)
    return model, tokenizer


def _common_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("model", metavar="MODEL",
                   help="training run, checkpoint, adapter or HF folder, hub id, or 'embedded'")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow Python shipped in the model's folder to run (off by default)")
    p.add_argument("--no-stream", action="store_true",
                   help="print each reply when it is complete instead of token by token")
    return p


def _options(args) -> GenerationOptions:
    return GenerationOptions(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                             args.seed)


def _with_system(messages: list[dict], system: str) -> list[dict]:
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def read_prompts(path: Path) -> list[tuple[str | None, list[dict]]]:
    """``(id, messages)`` per prompt: a text file holds one prompt a line (blank lines skipped);
    a ``.jsonl`` holds unified chat records, each used up to its final assistant turn."""
    from sparsedoc.data.schema import iter_jsonl

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    if path.suffix != ".jsonl":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return [(None, [{"role": "user", "content": ln}]) for ln in lines if ln]
    out = []
    for n, rec in enumerate(iter_jsonl(path, validate=False), start=1):
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        if not msgs or msgs[-1].get("role") != "user":
            raise ValueError(f"{path}: record {n}: expected a chat record ('messages') ending "
                             f"with a user turn, or with one assistant turn after it")
        out.append((rec.get("id"), msgs))
    return out


def generate_main(argv: list[str]) -> int:
    """``sparsedoc generate``: one reply per prompt, streamed, printed or written to JSONL."""
    ap = argparse.ArgumentParser(prog="sparsedoc generate", parents=[_common_args()],
                                 description="Generate replies with any model sparsedoc loads.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message ('-' reads it from stdin)")
    src.add_argument("--prompt-file", type=Path,
                     help="one prompt a line, or a .jsonl of unified chat records")
    ap.add_argument("--out", type=Path, help="write {prompt, output} lines to this JSONL file")
    args = ap.parse_args(argv)
    try:
        opts = _options(args)
        if args.prompt_file is not None:
            prompts = read_prompts(args.prompt_file)
        else:
            text = sys.stdin.read() if args.prompt == "-" else args.prompt
            prompts = [(None, [{"role": "user", "content": text.strip()}])]
        if not prompts or any(not m[-1]["content"].strip() for _, m in prompts):
            where = f" in {args.prompt_file}" if args.prompt_file else ""
            raise ValueError(f"empty prompt{where}")
        model, tokenizer = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    except (UserError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Several prompts into a file: a progress bar, since interleaved streams would be unreadable.
    batch = args.out is not None and len(prompts) > 1
    stream = not (args.no_stream or batch)
    rows = []
    if batch:
        from tqdm import tqdm

        prompts = tqdm(prompts, desc="generate", file=sys.stderr)
    for rid, msgs in prompts:
        reply = generate_reply(model, tokenizer, _with_system(msgs, args.system), opts,
                               streamer=_streamer(tokenizer) if stream else None)
        if not stream and not batch:
            print(reply)
        row = {"prompt": msgs[-1]["content"], "output": reply}
        rows.append(row if rid is None else {"id": rid, **row})
    if args.out is not None:
        from sparsedoc.data.schema import write_jsonl

        write_jsonl(args.out, rows)
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    return 0


CHAT_HELP = "commands: /reset (clear history), /system TEXT (set the system prompt), /exit"


def chat_main(argv: list[str]) -> int:
    """``sparsedoc chat``: a REPL that keeps the conversation and re-renders it every turn.

    Ctrl-C during a reply stops it and leaves that exchange out of the history (the model never
    saw its own cut-off reply end); Ctrl-C at the prompt clears the line; Ctrl-D quits.
    """
    ap = argparse.ArgumentParser(prog="sparsedoc chat", parents=[_common_args()],
                                 description=f"Chat with any model sparsedoc loads. {CHAT_HELP}")
    args = ap.parse_args(argv)
    try:
        opts = _options(args)
        model, tokenizer = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    except (UserError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(CHAT_HELP, file=sys.stderr)
    system, history = args.system, []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if line.split(maxsplit=1)[0] == "/system":
            system = line[len("/system"):].strip()
            print(f"(system prompt {'set' if system else 'cleared'})", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        messages = history + [{"role": "user", "content": line}]
        try:
            reply = generate_reply(model, tokenizer, _with_system(messages, system), opts,
                                   streamer=None if args.no_stream else _streamer(tokenizer))
        except KeyboardInterrupt:
            print("\n(reply interrupted; left out of the history)", file=sys.stderr)
            continue
        if args.no_stream:
            print(reply)
        history = messages + [{"role": "assistant", "content": reply}]
