"""A tiny random T5 for the encoder-decoder tests: its SentencePiece vocabulary is trained on
the fly from the shared SumPubMed text, once per test session (import these fixtures into a
test module; tests/conftest.py stays the decoder's)."""

from __future__ import annotations

from pathlib import Path

import pytest

VOCAB = 500
PREFIX = "summarize: "


def _articles(root: Path, n: int) -> list[tuple[str, str]]:
    """(text, abstract) of the first ``n`` SumPubMed articles, shortened for a fast test."""
    out = []
    for i in range(1, n + 1):
        text = (root / "text" / f"text_{i}.txt").read_text(encoding="utf-8").split()
        abstract = (root / "abstract" / f"abstract_{i}.txt").read_text(encoding="utf-8").split()
        out.append((" ".join(text[:60]), " ".join(abstract[:12])))
    return out


@pytest.fixture(scope="session")
def t5_spm(shared_data, tmp_path_factory) -> Path:
    """A SentencePiece model in T5's id layout (pad 0, EOS 1, unk 2, no BOS)."""
    import sentencepiece as spm

    root = shared_data / "sumpubmed"
    out = tmp_path_factory.mktemp("t5-spm")
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(f"{PREFIX}{t}\n{a}" for t, a in _articles(root, 60)),
                      encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "sp"), vocab_size=VOCAB, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2)
    return out / "sp.model"


@pytest.fixture(scope="session")
def tiny_t5_dir(t5_spm, tmp_path_factory) -> Path:
    """A 2-layer random T5 (d_model 32) and its tokenizer, saved as an HF model folder."""
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(t5_spm))
    tok = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(len(sp))],
                      extra_ids=0)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2,
                   num_decoder_layers=2, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0, dropout_rate=0.0)
    out = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def t5_data(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """SumPubMed summarisation records in the unified schema, as the converter writes them
    (a user message with the article, the assistant message with its abstract)."""
    from sparsedoc.data.schema import write_jsonl

    pairs = _articles(shared_data / "sumpubmed", 40)
    rec = [{"id": f"sumpubmed-{i}", "messages": [{"role": "user", "content": t},
                                                 {"role": "assistant", "content": a}],
            "meta": {"source": "sumpubmed", "task": "summarization", "lang": "en"}}
           for i, (t, a) in enumerate(pairs)]
    out = tmp_path_factory.mktemp("t5-data")
    write_jsonl(out / "train.jsonl", rec[:32])
    write_jsonl(out / "eval.jsonl", rec[32:])
    return out / "train.jsonl", out / "eval.jsonl"
