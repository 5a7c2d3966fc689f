"""Exports: a checkpoint people can load, share and serve, proven equal to the trained model.

    sparsedoc export RUN_OR_CHECKPOINT_OR_ADAPTER OUT [--mode auto|merged|routed|mixtral|dense]
                     [--dtype fp32|bf16|fp16] [--force] [--data FILE.jsonl ...]

``auto`` picks ``merged`` for LoRA and full fine-tunes, ``mixtral`` for an FFN-expert LoRA-MoE
and ``routed`` for a per-linear LoRA-MoE (``build.py`` describes each). Every export:

1. loads the trained model exactly as evaluation does (``sparsedoc.loader.load_trained``:
   a run's latest checkpoint, a given step, or an adapter folder; ZeRO shards consolidated with
   DeepSpeed's ``zero_to_fp32``);
2. builds the exported model in fp32 and, for the exact modes, checks its logits (tolerance
   ``EXACT_ATOL``) and greedy continuations against the trained model before writing anything;
3. writes it (sharded safetensors, config, tokenizer with its chat template, generation config)
   into a temporary sibling folder, reloads that folder with the loader a user would use, and
   checks every tensor bit for bit against the in-memory export and the logits and greedy
   continuations end to end;
4. only then adds ``export_metadata.json`` and the model card and renames the folder into place.

A failed check raises ``ExportError`` and leaves nothing at the target; the CLI exits non-zero.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparsedoc import fsio
from sparsedoc.artifacts import RUN_CONFIG, Loaded, read_adapter_meta
from sparsedoc.errors import UserError
from sparsedoc.export.build import (ExportError, build_dense, build_merged, build_mixtral,
                                    build_routed, measure_gate_means)
from sparsedoc.export.verify import (EXACT_ATOL, compare_weights, fp32_exact, greedy_diff,
                                     greedy_tokens, logit_diff, logits_of)
from sparsedoc.methods import UnknownMethod, method_class
from sparsedoc.methods.base import MethodError
from sparsedoc.models.load import is_encoder_decoder

log = logging.getLogger("sparsedoc")

MODES = ("auto", "merged", "routed", "mixtral", "dense")
SEQ2SEQ_MODES = ("auto", "merged")  # the others rebuild a decoder-only MoE model
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METADATA = "export_metadata.json"


class VerificationError(ExportError):
    """The export was built but is not the trained model (CLI exit code 1; bad input: 2)."""

# Used for verification when the source carries no data (a bare adapter folder).
FALLBACK_PROMPTS = [
    "What are the first-line treatments for community-acquired pneumonia in adults?",
    "A 62-year-old man has crushing chest pain radiating to the left arm. What should be done?",
    "高血压患者日常生活中应注意哪些方面？",
    "Summarise the warning signs of stroke for a patient leaflet.",
]


@dataclass
class ExportOptions:
    mode: str = "auto"
    dtype: str = "fp32"
    force: bool = False
    # Held-out JSONL records (verification, dense gap) and calibration records (dense gate
    # means); by default the run's eval and train splits.
    data: list[str] = field(default_factory=list)
    calib_data: list[str] = field(default_factory=list)
    max_shard_size: str = "2GB"
    samples: int = 4  # sequences whose logits are compared
    sample_tokens: int = 128  # tokens per compared sequence
    greedy_new_tokens: int = 16
    atol: float = EXACT_ATOL
    calib_batches: int = 8  # dense: batches of 8 records whose mean gates are merged
    gap_records: int = 64  # dense: held-out records the quality gap is measured on
    gap_max_tokens: int = 512  # dense: calibration and gap records are cut to this length
    device: str = "cpu"
    trust_remote_code: bool = False  # the user's opt-in to run Python shipped with the base model


# ---- the target folder ---------------------------------------------------------------------------
def check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out}: folder exists and is not empty; pass --force to replace it "
                          f"(it is only replaced once the new export has verified)")


def _temp_sibling(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


# ---- what was trained --------------------------------------------------------------------------
def _load_source(src: str, device: str, trust_remote_code: bool = False):
    from sparsedoc.loader import load_trained

    from safetensors import SafetensorError

    try:
        return load_trained(src, dtype="fp32", device=device,
                            trust_remote_code=trust_remote_code)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ExportError(f"{src}: cannot load the trained model: {e}") from None
    except SafetensorError as e:  # peft reading a truncated or corrupt adapter file
        raise ExportError(f"{src}: a weight file is unreadable or corrupt ({e})") from None


def _moe_cfg(model, loaded: Loaded):
    from sparsedoc.config import MoECfg

    if loaded.adapter_dir and loaded.method == "lora_moe":
        return MoECfg(**read_adapter_meta(loaded.adapter_dir).moe)
    if getattr(model.config, "sparsedoc_moe", None):
        return MoECfg(**model.config.sparsedoc_moe)
    return None


def resolve_mode(mode: str, method: str, moe_cfg) -> str:
    """The export mode for ``--mode``, as the method says (``Method.export_mode``)."""
    if method == "base":
        raise ExportError("the source is a plain model without anything trained to export")
    try:
        return method_class(method).export_mode(mode, moe_cfg)
    except (MethodError, UnknownMethod) as e:
        raise ExportError(str(e)) from None


def _run_config(loaded: Loaded):
    from sparsedoc.config import load_config

    ckpt = loaded.checkpoint
    if ckpt and (Path(ckpt) / RUN_CONFIG).is_file():
        return load_config(Path(ckpt) / RUN_CONFIG)
    return None


def _records(loaded: Loaded, data: list[str], calib_data: list[str]):
    """``(calibration records, held-out records, run config or None, where the calibration
    records come from)``: ``--calib-data`` / ``--data`` first, else the run's train / eval
    splits. Calibrating on the held-out records is allowed but flagged: the gap it measures is
    then optimistic."""
    from sparsedoc.data.dataset import load_records, split_records

    cfg = _run_config(loaded)
    train, held_out = [], []
    if cfg is not None and not (data and calib_data):
        try:
            train, held_out = split_records(cfg.data, cfg.train.seed)
        except (FileNotFoundError, ValueError) as e:
            log.warning("the run's data is not readable here (%s)", e)
    held_out = load_records(data) if data else held_out or train
    if calib_data:
        return load_records(calib_data), held_out, cfg, "--calib-data"
    if train:
        return train, held_out, cfg, "the run's training split"
    return held_out, held_out, cfg, "the held-out records themselves (optimistic gap)"


def _tokenize(records: list[dict], tokenizer, cfg, max_len: int):
    from sparsedoc.data.tokenize import tokenize_records

    rows, _ = tokenize_records(records, tokenizer, max_seq_len=max_len,
                               system_prompt=cfg.data.system_prompt if cfg else "")
    return rows


def _prompt_ids(tokenizer, text: str) -> list[int]:
    from sparsedoc.eval.prompts import encode, render_chat

    return encode(tokenizer, render_chat(tokenizer, [{"role": "user", "content": text}]), True)


SEQ2SEQ_DECODER_TOKENS = 8  # target tokens after decoder_start an encoder-decoder is compared on


def seq2seq_verification_inputs(records: list[dict], tokenizer, cfg, n: int, max_len: int,
                                decoder_start: int) -> tuple[list[tuple], list[list[int]]]:
    """An encoder-decoder's verification inputs, as it was trained (no chat template): the
    source is ``data.source_prefix`` + the user text, the decoder reads ``decoder_start`` and
    the first target tokens. Returns ((source, decoder ids) pairs, sources for greedy)."""
    from sparsedoc.data.tokenize import source_and_target, to_chat

    prefix = cfg.data.source_prefix if cfg else ""
    pairs = []
    for r in records[:n]:
        try:
            source, target = source_and_target(to_chat(r))
        except ValueError:  # no assistant message: nothing to read as a target
            continue
        pairs.append((source, target))
    if not pairs:
        pairs = [(p, p) for p in FALLBACK_PROMPTS[:n]]  # any decoder tokens compare logits
    sources, samples = [], []
    for source, target in pairs:
        ids = tokenizer(prefix + source, truncation=True, max_length=max_len)["input_ids"]
        dec = tokenizer(target, add_special_tokens=False)["input_ids"][:SEQ2SEQ_DECODER_TOKENS]
        sources.append(ids)
        samples.append((ids, [decoder_start] + dec))
    return samples, sources


def verification_inputs(records: list[dict], tokenizer, cfg, n: int, max_len: int
                        ) -> tuple[list[list[int]], list[list[int]]]:
    """(sequences for the logit comparison, prompts for the greedy comparison)."""
    rows = _tokenize(records[:n], tokenizer, cfg, max_len) if records else []
    sequences = [r.input_ids for r in rows]
    prompts = []
    for r in records[:n]:
        users = [m["content"] for m in r.get("messages", []) if m["role"] == "user"]
        text = users[0] if users else r.get("question")
        if text:
            prompts.append(_prompt_ids(tokenizer, text)[-max_len:])
    if not sequences:
        sequences = [_prompt_ids(tokenizer, p)[-max_len:] for p in FALLBACK_PROMPTS[:n]]
    if not prompts:
        prompts = [_prompt_ids(tokenizer, p)[-max_len:] for p in FALLBACK_PROMPTS[:n]]
    return sequences, prompts


# ---- dense gap ------------------------------------------------------------------------------------
@torch.no_grad()
def measure_gap(routed, dense, tokenizer, records: list[dict], cfg, max_len: int) -> dict:
    """How far the dense approximation is from the routed model on held-out records: logit
    differences over real tokens, perplexity on the target tokens, and MCQ accuracy."""
    from sparsedoc.config import EvalCfg
    from sparsedoc.data.collate import PadCollator
    from sparsedoc.data.dataset import eval_batches
    from sparsedoc.eval.mcq import is_closed_qa, mcq_item, score_mcq, summarize
    from sparsedoc.data.batch import real_tokens

    rows = _tokenize(records, tokenizer, cfg, max_len)
    batches = eval_batches(rows, PadCollator(tokenizer.pad_token_id, {}), 8, 0, 1)
    max_d, sum_d, n_tok = 0.0, 0.0, 0
    nll = {"routed": 0.0, "dense": 0.0}
    n_target = 0
    with fp32_exact():
        for b in tqdm(batches, desc="dense gap", leave=False):
            mask = real_tokens(b)  # not the rows that only fill the last batch
            logits = {}
            for name, m in (("routed", routed), ("dense", dense)):
                dev = next(m.parameters()).device
                logits[name] = m(input_ids=b["input_ids"].to(dev),
                                 attention_mask=b["attention_mask"].to(dev),
                                 use_cache=False).logits.float().cpu()
            d = (logits["routed"] - logits["dense"]).abs()[mask]
            max_d, sum_d, n_tok = max(max_d, float(d.max())), sum_d + float(d.sum()), \
                n_tok + d.numel()
            labels = b["labels"][:, 1:]
            keep = labels != -100
            for name, lg in logits.items():
                lp = lg[:, :-1].log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1))
                nll[name] += float(-lp.squeeze(-1)[keep].sum())
            n_target += int(keep.sum())
    items = [mcq_item(r) for r in records if "options" in r or is_closed_qa(r)]
    acc = {"routed": None, "dense": None}
    if items:
        ecfg = EvalCfg(prompt_format="chat", batch_size=8)
        for name, m in (("routed", routed), ("dense", dense)):
            preds, _ = score_mcq(m, tokenizer, items, "loglik", ecfg, progress=True)
            acc[name] = summarize(items, preds, "loglik")["accuracy"]
    ppl = {k: float(torch.tensor(v / max(n_target, 1)).exp()) for k, v in nll.items()}
    return {"eval_records": len(rows), "target_tokens": n_target,
            "max_abs_logit_diff": max_d, "mean_abs_logit_diff": sum_d / max(n_tok, 1),
            "ppl_routed": ppl["routed"], "ppl_dense": ppl["dense"],
            "mcq_items": len(items), "mcq_acc_routed": acc["routed"],
            "mcq_acc_dense": acc["dense"]}


# ---- the export ------------------------------------------------------------------------------------
def _reload(tmp: Path, mode: str, dtype: torch.dtype):
    """The written folder loaded as a user would: the auto class its config asks for
    (``auto_model_class``: seq2seq LM for T5, causal LM otherwise)."""
    from transformers import AutoConfig

    from sparsedoc.models.load import auto_model_class
    from sparsedoc.moe.hf import register_auto_classes

    register_auto_classes()  # routed: the registered class, no remote code

    model, info = auto_model_class(AutoConfig.from_pretrained(str(tmp))).from_pretrained(
        str(tmp), dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                         "mismatched_keys")}
    if bad:
        raise ExportError(f"{tmp}: the written folder does not load cleanly: {bad}")
    expected = {"routed": "SparsedocMoEForCausalLM", "mixtral": "MixtralForCausalLM"}.get(mode)
    if expected and type(model).__name__ != expected:
        raise ExportError(f"{tmp}: loads as {type(model).__name__}, expected {expected}")
    return model.eval()


def _add_legacy_rope_keys(config_path: Path) -> None:
    """transformers 5 writes ``rope_parameters`` only; servers and older transformers read
    ``rope_theta`` (and ``rope_scaling``) and would fall back to their own default theta
    (Mixtral's is 1e6) without a word. Write both spellings."""
    cfg = json.loads(config_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _respect_umask(folder: Path) -> None:
    """safetensors writes its files owner-only (0600); an export is meant to be shared and
    served by other users, so give every file the permissions the user's umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export(src: str | Path, out: str | Path, opts: ExportOptions | None = None) -> dict:
    """Export ``src`` (run, checkpoint or adapter folder) to ``out``; returns the metadata.

    Raises ``ExportError`` on bad input or failed verification, leaving ``out`` untouched."""
    opts = opts or ExportOptions()
    if opts.dtype not in DTYPES:
        raise ExportError(f"--dtype {opts.dtype}: expected one of {', '.join(DTYPES)}")
    if opts.mode not in MODES:
        raise ExportError(f"--mode {opts.mode}: expected one of {', '.join(MODES)}")
    out = Path(out)
    check_target(out, opts.force)
    t0 = time.perf_counter()
    dtype = DTYPES[opts.dtype]
    model, tokenizer, loaded = _load_source(str(src), opts.device, opts.trust_remote_code)
    moe_cfg = _moe_cfg(model, loaded)
    seq2seq = is_encoder_decoder(model)
    if seq2seq and opts.mode not in SEQ2SEQ_MODES:
        raise ExportError(f"--mode {opts.mode}: an encoder-decoder ({model.config.model_type}) "
                          f"exports only as {' or '.join(SEQ2SEQ_MODES)} (the LoRA or full "
                          f"fine-tune merged into the base); routed, mixtral and dense build a "
                          f"decoder-only LoRA-MoE model")
    mode = resolve_mode(opts.mode, loaded.method, moe_cfg)
    calib_records, held_out, run_cfg, calib_source = _records(loaded, opts.data, opts.calib_data)
    if seq2seq:
        samples, prompts = seq2seq_verification_inputs(
            held_out, tokenizer, run_cfg, opts.samples, opts.sample_tokens,
            model.config.decoder_start_token_id)
    else:
        samples, prompts = verification_inputs(held_out, tokenizer, run_cfg, opts.samples,
                                                opts.sample_tokens)
    log.info("export %s (%s) -> %s as %s, %s", src, loaded.method, out, mode, opts.dtype)

    gap = None
    if mode == "dense":
        if not calib_records:
            raise ExportError("mode dense measures the mean gates and the quality gap on data: "
                              "export a run whose data files are readable here, or pass --data "
                              "HELD_OUT.jsonl [--calib-data CALIB.jsonl]")
        from sparsedoc.data.collate import PadCollator
        from sparsedoc.data.dataset import eval_batches

        pick = random.Random(0).sample(calib_records, min(len(calib_records),
                                                          8 * opts.calib_batches))
        rows = _tokenize(pick, tokenizer, run_cfg, opts.gap_max_tokens)
        calib = eval_batches(rows, PadCollator(tokenizer.pad_token_id, {}), 8, 0, 1)
        built = build_dense(model, measure_gate_means(model, calib))
        gap = measure_gap(model, built, tokenizer, held_out[:opts.gap_records], run_cfg,
                          opts.gap_max_tokens)
        gap["calibration_records"] = len(rows)
        gap["calibration_source"] = calib_source
        # the file must reproduce the dense model; its distance to the routed one is the gap
        expected_logits = logits_of(built, samples)
        expected_greedy = greedy_tokens(built, tokenizer, prompts, opts.greedy_new_tokens)
        reference = "in-memory dense approximation (fp32)"
    else:
        # The reference is taken before building: builders share the trained model's tensors
        # (no second copy of an 8B model), so a builder that wrote into one would otherwise
        # move the reference along with the export and hide its own bug.
        expected_logits = logits_of(model, samples)
        expected_greedy = greedy_tokens(model, tokenizer, prompts, opts.greedy_new_tokens)
        built = {"merged": lambda: build_merged(model, loaded.method),
                 "routed": lambda: build_routed(model, moe_cfg),
                 "mixtral": lambda: build_mixtral(model, moe_cfg)}[mode]()
        reference = f"training-time model ({loaded.method}, fp32)"

    checks: dict = {"reference": reference, "tolerance": opts.atol, "dtype": opts.dtype,
                    "samples": len(samples), "sample_tokens": sum(map(len, samples))}
    failures = []
    if mode != "dense":  # 1. the in-memory export is the trained model
        pre = logit_diff(expected_logits, logits_of(built, samples))
        pre.update(greedy_diff(expected_greedy, greedy_tokens(built, tokenizer, prompts,
                                                              opts.greedy_new_tokens)))
        checks["in_memory"] = pre
        if pre["max_abs_logit_diff"] > opts.atol:
            failures.append(f"in-memory export differs from the trained model: max |logit "
                            f"diff| {pre['max_abs_logit_diff']:.3g} > {opts.atol:g}")
        if not pre["greedy_match"]:
            failures.append("in-memory export's greedy continuations differ from the trained "
                            "model's")
    if failures:
        raise VerificationError("verification failed before writing: " + "; ".join(failures))

    tmp = _temp_sibling(out)
    try:
        built = built.to(dtype)
        gen = getattr(model, "generation_config", None)  # the base model's sampling defaults
        if gen is not None:
            built.generation_config = copy.deepcopy(gen)
        built.save_pretrained(str(tmp), max_shard_size=opts.max_shard_size,
                              safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _add_legacy_rope_keys(tmp / "config.json")
        _respect_umask(tmp)
        # 2. the folder on disk holds exactly the in-memory export
        reloaded = _reload(tmp, mode, dtype)
        checks["weights"] = compare_weights(built, reloaded, dtype)
        if not checks["weights"]["weights_equal"]:
            failures.append(f"written weights differ from the in-memory export: "
                            f"{checks['weights']}")
        # 3. end to end: the reloaded folder against the trained (or dense) reference
        reloaded = reloaded.float()
        end = logit_diff(expected_logits, logits_of(reloaded, samples))
        end.update(greedy_diff(expected_greedy, greedy_tokens(reloaded, tokenizer, prompts,
                                                              opts.greedy_new_tokens)))
        checks["reloaded"] = end
        if dtype == torch.float32:
            if end["max_abs_logit_diff"] > opts.atol:
                failures.append(f"reloaded export differs: max |logit diff| "
                                f"{end['max_abs_logit_diff']:.3g} > {opts.atol:g}")
            if not end["greedy_match"]:
                failures.append("reloaded export's greedy continuations differ")
        else:
            checks["note"] = (f"{opts.dtype} export: the merge is checked in fp32 and the saved "
                              f"tensors bit for bit; the end-to-end logit difference is the "
                              f"{opts.dtype} rounding and is reported, not enforced")
        checks["passed"] = not failures
        if failures:
            raise VerificationError("verification failed: " + "; ".join(failures))
        meta = {"format": "sparsedoc-export", "version": 1, "mode": mode,
                "method": loaded.method, "source": str(Path(src).resolve()),
                "step": loaded.step, "base_model": loaded.base_model,
                "dtype": opts.dtype, "approximate": mode == "dense",
                "adapter_config": asdict(moe_cfg) if moe_cfg else None,
                "verification": checks, "dense_gap": gap,
                "export_seconds": round(time.perf_counter() - t0, 2)}
        meta["size_bytes"] = _folder_bytes(tmp)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, default=str))
        _write_card(tmp, meta, loaded)
        fsio.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_card(folder: Path, meta: dict, loaded: Loaded) -> None:
    from sparsedoc.export.card import write_model_card
    from sparsedoc.export.lineage import collect_lineage

    card = dict(meta)
    card["lineage"] = collect_lineage(Path(loaded.checkpoint or loaded.path))
    write_model_card(folder, card)


# ---- command line ----------------------------------------------------------------------------------
def summary_lines(meta: dict) -> list[str]:
    v = meta["verification"]
    end = v["reloaded"]
    lines = [f"mode {meta['mode']} ({meta['method']}), {meta['dtype']}, "
             f"{meta['size_bytes'] / 2**20:.1f} MiB, {meta['export_seconds']:.1f} s",
             f"verified against {v['reference']}: max |logit diff| "
             f"{end['max_abs_logit_diff']:.3g}, mean {end['mean_abs_logit_diff']:.3g} over "
             f"{v['samples']} sequences ({v['sample_tokens']} tokens), tolerance {v['tolerance']:g}; "
             f"greedy {end['greedy_prompts_matching']}/{end['greedy_prompts']} prompts identical; "
             f"weights bit-identical: {v['weights']['weights_equal']}"]
    g = meta.get("dense_gap")
    if g:
        def f(x, spec=".2f"):
            return "n/a" if x is None else format(x, spec)
        lines.append(
            f"APPROXIMATE (dense expected-gate merge) vs the routed model on "
            f"{g['eval_records']} held-out records: max |logit diff| {g['max_abs_logit_diff']:.3g}"
            f", mean {g['mean_abs_logit_diff']:.3g}; perplexity {f(g['ppl_routed'], '.3f')} "
            f"routed -> {f(g['ppl_dense'], '.3f')} dense; MCQ accuracy ({g['mcq_items']} items) "
            f"{f(g['mcq_acc_routed'], '.1f')}% -> {f(g['mcq_acc_dense'], '.1f')}%; mean gates "
            f"from {g['calibration_records']} records of {g['calibration_source']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparsedoc export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="training run folder, checkpoint folder (checkpoints/step-N) "
                                  "or adapter folder")
    p.add_argument("out", help="export folder to create")
    p.add_argument("--mode", default="auto", choices=MODES)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--data", nargs="*", default=[],
                   help="held-out unified-schema JSONL for verification and the dense gap "
                        "(default: the run's eval split)")
    p.add_argument("--calib-data", nargs="*", default=[],
                   help="JSONL whose records set the dense mode's mean gates (default: the "
                        "run's training split, else --data, flagged as optimistic)")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--atol", type=float, default=EXACT_ATOL)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model is loaded in fp32)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow Python shipped in the base model's folder to run (off by default; "
                        "read that code first)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    opts = ExportOptions(mode=args.mode, dtype=args.dtype, force=args.force, data=args.data,
                         calib_data=args.calib_data,
                         max_shard_size=args.max_shard_size, samples=args.samples,
                         atol=args.atol, device=args.device,
                         trust_remote_code=args.trust_remote_code)
    try:
        meta = export(args.source, args.out, opts)
    except UserError as e:
        print(f"export FAILED: {e}", file=sys.stderr)
        return 1 if isinstance(e, VerificationError) else 2
    for line in summary_lines(meta):
        print(line)
    print(f"export verified and written to {Path(args.out).resolve()}")
    return 0
