"""Encoder-decoder models (T5) in the same harness: loading, source/target rows, training,
generation with ROUGE, merged export, and the LoRA-MoE refusal."""

from __future__ import annotations

import pytest
import torch

from t5_fixtures import PREFIX

from sparsedoc.config import Config, DataCfg, ModelCfg


def _load(path):
    from sparsedoc.models.load import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelCfg(name_or_path=str(path), dtype="fp32"))


def test_an_encoder_decoder_loads_as_a_seq2seq_lm(tiny_t5_dir):
    from transformers import T5ForConditionalGeneration

    model, tok, _ = _load(tiny_t5_dir)
    assert isinstance(model, T5ForConditionalGeneration)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1


def test_source_target_rows_train_on_the_target_and_eos_only(tiny_t5_dir, t5_spm, tmp_path):
    """Hand-computed ids from the raw SentencePiece model: encoder = prefix + source + EOS,
    labels = target + EOS, padding -100 (not a copy of the code's own tokenization)."""
    import sentencepiece as spm

    from sparsedoc.data.dataset import make_collator, prepare_data
    from sparsedoc.data.schema import write_jsonl

    sp = spm.SentencePieceProcessor(model_file=str(t5_spm))
    recs = [{"id": "a", "messages": [{"role": "user", "content": "the cell grows"},
                                     {"role": "assistant", "content": "cells grow"}],
             "meta": {"source": "t", "task": "summarization", "lang": "en"}},
            {"id": "b", "messages": [{"role": "user", "content": "protein levels in blood "
                                      "were measured in patients"},
                                     {"role": "assistant", "content": "we measured protein in "
                                      "the blood of many patients over two years"}],
             "meta": {"source": "t", "task": "summarization", "lang": "en"}}]
    write_jsonl(tmp_path / "r.jsonl", recs)
    _, tok, _ = _load(tiny_t5_dir)
    cfg = DataCfg(train_files=[str(tmp_path / "r.jsonl")], eval_files=[], source_prefix=PREFIX,
                  max_source_len=6)
    data = prepare_data(cfg, tok, seed=0, seq2seq=True)
    batch = make_collator(cfg, tok, {}, seq2seq=True)(data.train)
    eos = 1
    src_a = sp.encode(PREFIX + "the cell grows")[:5] + [eos]  # cut to 6 with EOS kept
    src_b = sp.encode(PREFIX + "protein levels in blood were measured in patients")[:5] + [eos]
    tgt_a = sp.encode("cells grow") + [eos]
    tgt_b = sp.encode("we measured protein in the blood of many patients over two years") + [eos]
    width = -(-len(tgt_b) // 8) * 8
    assert batch["input_ids"][0, :6].tolist() == src_a
    assert batch["input_ids"][1, :6].tolist() == src_b
    assert batch["attention_mask"].sum(1).tolist() == [6, 6]
    assert batch["labels"].tolist() == [tgt_a + [-100] * (width - len(tgt_a)),
                                        tgt_b + [-100] * (width - len(tgt_b))]
    assert data.stats["train"]["truncated"] == 2  # both sources were cut


def test_a_target_over_max_target_len_is_skipped_with_the_reason(tiny_t5_dir, t5_data):
    from sparsedoc.data.dataset import prepare_data

    train, _ = t5_data
    _, tok, _ = _load(tiny_t5_dir)
    cfg = DataCfg(train_files=[str(train)], eval_files=[], max_target_len=40)
    data = prepare_data(cfg, tok, seed=0, seq2seq=True)
    skipped = data.stats["skipped_ids"]["train"]
    assert skipped and all("exceeds max_target_len=40" in why for why in skipped.values())
    assert all(len(r.labels) <= 40 for r in data.train)


def test_packing_is_refused_for_an_encoder_decoder(tiny_t5_dir, t5_data):
    from sparsedoc.config import ConfigError
    from sparsedoc.data.dataset import prepare_data

    _, tok, _ = _load(tiny_t5_dir)
    with pytest.raises(ConfigError, match=r"data\.packing=true: .*encoder-decoder"):
        prepare_data(DataCfg(train_files=[str(t5_data[0])], packing=True), tok, 0, seq2seq=True)


def test_lora_moe_refuses_an_encoder_decoder_naming_what_is_missing(tiny_t5_dir):
    from sparsedoc.errors import UserError
    from sparsedoc.methods import new_method
    from sparsedoc.methods.lora_moe import EncoderDecoderUnsupported

    model, _, _ = _load(tiny_t5_dir)
    cfg = Config()
    cfg.model.name_or_path = str(tiny_t5_dir)
    with pytest.raises(EncoderDecoderUnsupported) as e:
        new_method("lora_moe").build(model, cfg)
    assert isinstance(e.value, UserError)
    assert "encoder-decoder (t5)" in str(e.value) and "adapter.method=lora" in str(e.value)


# LoRA on every T5 projection (attention q/k/v/o, feed-forward wi/wo): the default targets are
# a decoder's names (q_proj, ...), which T5 does not have.
T5_LORA = "adapter.lora.target_modules=[q,k,v,o,wi,wo]"
METHOD_ARGS = {"train_lora.py": [T5_LORA, "train.lr=5e-3"],
               "train_prompt.py": ["adapter.prompt.num_virtual_tokens=8", "train.lr=0.5"],
               "train_full.py": ["train.lr=3e-3"]}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(METHOD_ARGS))
def test_each_method_trains_a_t5_under_the_deepspeed_launcher(tiny_t5_dir, t5_data, tmp_path,
                                                              recipe):
    """The real launcher, 2 CPU ranks, ZeRO-2: finite training loss and a held-out loss that
    falls over a few steps (the random T5 starts far from the SumPubMed abstracts)."""
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sparsedoc.distributed import free_port
    from sparsedoc.logging import read_metrics

    repo = Path(__file__).resolve().parents[1]
    train, evals = t5_data
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
           "--master_port", str(free_port()), str(repo / "recipes" / recipe),
           "--ds", str(repo / "ds_configs" / "zero2.json"),
           f"model.name_or_path={tiny_t5_dir}", "model.dtype=fp32", f"data.train_files=[{train}]",
           f"data.eval_files=[{evals}]", f"data.source_prefix={PREFIX!r}",
           "data.max_source_len=96", "data.max_target_len=64", "data.max_seq_len=96",
           f"train.output_dir={out}", "train.max_steps=4", "train.micro_batch_size=4",
           "train.warmup_steps=0", "train.lr_schedule=constant", "train.log_every=1",
           "train.eval_every=4", "train.save_every=100", "logging.wandb=false",
           *METHOD_ARGS[recipe]]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    evals_by_step = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert math.isfinite(evals_by_step[4]) and evals_by_step[4] < evals_by_step[0] - 0.02, \
        evals_by_step


@pytest.mark.parametrize("num_beams", [1, 2])
def test_t5_generation_feeds_rouge_as_rouge_score_computes_it(tiny_t5_dir, t5_data, num_beams):
    """Greedy and beam generation on the tiny T5 run, produce the model's own continuation
    (checked against transformers' generate on the unpadded source), and the ROUGE of every
    item is what rouge_score gives on the same strings."""
    from rouge_score import rouge_scorer
    from transformers import AutoModelForSeq2SeqLM

    from dataclasses import replace

    from sparsedoc.config import EvalCfg
    from sparsedoc.data.schema import read_jsonl
    from sparsedoc.eval.generation import gen_items, score_generation

    model, tok, _ = _load(tiny_t5_dir)
    model.generation_config.suppress_tokens = [0]  # the random T5 would emit padding only
    items = [it for r in read_jsonl(t5_data[1])[:3] for it in gen_items(r)]
    cfg = EvalCfg(max_new_tokens=8, batch_size=3, bertscore=False, num_beams=num_beams,
                  source_prefix=PREFIX, max_prompt_tokens=64)
    preds, _ = score_generation(model, tok, items, cfg)
    # a random T5 shares no word with the abstracts: references that hold part of the
    # (deterministic) prediction make the ROUGE comparison below one of non-zero values
    items = [replace(it, reference=" ".join(p["prediction"].split()[:2] + [it.reference]))
             for it, p in zip(items, preds)]
    preds, _ = score_generation(model, tok, items, cfg)
    plain = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    assert any(p["rouge1"] > 0 for p in preds), preds
    for it, p in zip(items, preds):
        src = tok(PREFIX + it.messages[-1]["content"], truncation=True, max_length=64,
                  return_tensors="pt")
        out = plain.generate(**src, max_new_tokens=8, do_sample=False, num_beams=num_beams,
                             suppress_tokens=[0])
        assert p["prediction"] == tok.decode(out[0], skip_special_tokens=True).strip()
        ref = scorer.score(it.reference, p["prediction"])
        for k in ("rouge1", "rouge2", "rougeL"):
            assert p[k] == pytest.approx(ref[k].fmeasure, abs=1e-9), (k, p, ref)


def test_a_merged_t5_lora_reloads_in_plain_transformers_with_equal_logits(tiny_t5_dir, tmp_path):
    """LoRA's merge (the export's merged mode) on a T5: the folder it saves loads with
    AutoModelForSeq2SeqLM and gives the logits of the unmerged peft model."""
    from transformers import AutoModelForSeq2SeqLM

    from sparsedoc.methods import method_class, new_method

    model, tok, _ = _load(tiny_t5_dir)
    cfg = Config()
    cfg.model.name_or_path = str(tiny_t5_dir)
    cfg.adapter.lora.target_modules = ["q", "k", "v", "o", "wi", "wo"]
    peft_model = new_method("lora").build(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft_model.eval()
    enc = tok([PREFIX + "the patients were treated", PREFIX + "blood"], padding=True,
              return_tensors="pt")
    labels = tok(["treated patients", "blood"], padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = peft_model(**enc, decoder_input_ids=labels).logits
        base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()(
            **enc, decoder_input_ids=labels).logits
    method_class("lora").merged(peft_model).save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = reloaded(**enc, decoder_input_ids=labels).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _train_t5_lora_in_process(tiny_t5_dir, t5_data, out, *extra, method="lora"):
    """A real run folder from the trainer itself, in this process (one rank, 2 steps): its
    checkpoint and config.yaml (with data.source_prefix) are what export and evaluate read."""
    from pathlib import Path

    from sparsedoc.train.recipe import run_recipe

    repo = Path(__file__).resolve().parents[1]
    train, evals = t5_data
    run_recipe(method, [
        "--ds", str(repo / "ds_configs" / "zero2.json"), f"model.name_or_path={tiny_t5_dir}",
        "model.dtype=fp32", f"data.train_files=[{train}]", f"data.eval_files=[{evals}]",
        f"data.source_prefix={PREFIX!r}", "data.max_source_len=96", "data.max_target_len=64",
        "data.max_seq_len=96", f"train.output_dir={out}", "train.max_steps=2",
        "train.micro_batch_size=4", "train.warmup_steps=0", "train.lr_schedule=constant",
        "train.eval_every=100", "train.save_every=100", "logging.wandb=false", *extra])
    return out


def test_export_of_a_t5_lora_run_reloads_in_plain_transformers_with_the_trained_logits(
        tiny_t5_dir, t5_data, tmp_path):
    """``sparsedoc export`` on a T5 LoRA run: the folder loads with AutoModelForSeq2SeqLM and
    gives the logits of the trained peft model (LoRA unmerged, loaded by peft itself), and the
    metadata records a passed verification on plain source prompts."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from sparsedoc.export import ExportOptions, export

    run = _train_t5_lora_in_process(tiny_t5_dir, t5_data, tmp_path / "run", T5_LORA,
                                    "train.lr=5e-2")
    meta = export(run, tmp_path / "out", ExportOptions(samples=2, greedy_new_tokens=4))
    assert meta["mode"] == "merged" and meta["verification"]["passed"], meta["verification"]
    assert meta["verification"]["reloaded"]["max_abs_logit_diff"] < 1e-3

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    enc = tok([PREFIX + "the patients were treated with", PREFIX + "blood pressure"],
              padding=True, return_tensors="pt")
    dec = torch.tensor([[0, 5, 9, 17], [0, 33, 4, 2]])  # decoder_start, then any target ids
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    trained = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir),
                                        run / "checkpoints" / "step-000002" / "adapter").eval()
    exported = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        expected = trained(**enc, decoder_input_ids=dec).logits
        got = exported(**enc, decoder_input_ids=dec).logits
        untrained = base(**enc, decoder_input_ids=dec).logits
    assert (expected - untrained).abs().max() > 1e-3  # the 2 steps moved the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["routed", "mixtral", "dense"])
def test_export_refuses_a_decoder_only_mode_for_a_t5(tiny_t5_dir, tmp_path, mode):
    from sparsedoc.export import ExportError, ExportOptions, export
    from sparsedoc.methods import new_method

    model, tok, _ = _load(tiny_t5_dir)
    cfg = Config()
    cfg.model.name_or_path = str(tiny_t5_dir)
    cfg.adapter.lora.target_modules = ["q", "v"]
    new_method("lora").build(model, cfg).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ExportError) as e:
        export(tmp_path / "adapter", tmp_path / "out", ExportOptions(mode=mode))
    assert f"--mode {mode}: an encoder-decoder (t5) exports only as auto or merged" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("labels", ["data", "model"])
def test_sensitivity_lora_trains_a_t5_with_ranks_from_its_seq2seq_loss(tiny_t5_dir, t5_data,
                                                                      tmp_path, labels):
    """Sensitivity-LoRA on a T5: the calibration forward takes the seq2seq batch (encoder ids,
    decoder labels), the rank map covers T5's projections, and the adapter is a SEQ_2_SEQ_LM
    peft adapter that plain peft loads onto AutoModelForSeq2SeqLM with every rank it planned."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    run = _train_t5_lora_in_process(
        tiny_t5_dir, t5_data, tmp_path / "run", T5_LORA, "adapter.lora.r=4",
        "adapter.sensitivity.calibration_batches=1", f"adapter.sensitivity.labels={labels}",
        method="sensitivity_lora")
    adapter = run / "checkpoints" / "step-000002" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    ranks = config["rank_pattern"]
    assert ranks and {k.rsplit(".", 1)[-1] for k in ranks} <= {"q", "k", "v", "o", "wi", "wo"}
    assert len(set(ranks.values())) > 1, ranks  # allocated, not uniform
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir), adapter)
    for name, rank in ranks.items():
        module = model.get_submodule(f"base_model.model.{name}")
        assert module.lora_A["default"].weight.shape[0] == rank, name


def test_lora_on_a_t5_left_at_the_decoder_default_targets_uses_peft_s_t5_default(
        tiny_t5_dir, caplog):
    """The decoder-default target_modules (q_proj, ...) name nothing in a T5: LoRA falls back
    to peft's per-architecture default, logged, and wraps exactly the modules plain peft
    wraps when no targets are given."""
    import logging

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    from sparsedoc.methods import new_method

    model, _, _ = _load(tiny_t5_dir)
    cfg = Config()
    cfg.model.name_or_path = str(tiny_t5_dir)
    assert cfg.adapter.lora.target_modules[0] == "q_proj"  # the decoder default
    with caplog.at_level(logging.INFO, logger="sparsedoc"):
        ours = new_method("lora").build(model, cfg)
    assert "using peft's default for it: ['q', 'v']" in caplog.text
    plain = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir),
                           LoraConfig(r=8, task_type="SEQ_2_SEQ_LM"))

    def wrapped(m):
        return sorted(n for n, _ in m.named_parameters() if "lora_A" in n)

    assert wrapped(ours) == wrapped(plain) and wrapped(ours)


def test_an_encoder_decoder_without_a_peft_default_names_the_field(tiny_t5_dir, monkeypatch):
    from peft.utils import constants

    from sparsedoc.errors import UserError
    from sparsedoc.methods import new_method

    monkeypatch.delitem(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "t5")
    model, _, _ = _load(tiny_t5_dir)
    cfg = Config()
    cfg.model.name_or_path = str(tiny_t5_dir)
    with pytest.raises(UserError) as e:
        new_method("lora").build(model, cfg)
    assert "set adapter.lora.target_modules" in str(e.value) and "'t5'" in str(e.value)
