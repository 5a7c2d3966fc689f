"""Encoder-decoder models (T5) in the same harness: loading, source/target rows, training,
generation with ROUGE, merged export, and the LoRA-MoE refusal."""

from __future__ import annotations

import pytest
import torch

from t5_fixtures import PREFIX, t5_data, t5_spm, tiny_t5_dir  # noqa: F401  (fixtures)

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
