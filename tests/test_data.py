"""sparsedoc.data: schema checks, assistant-only masking with the real SmolLM2 chat template,
padding, packing without cross-contamination, and the resumable rank-sharded sampler."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch

from sparsedoc.config import ModelCfg
from sparsedoc.data.collate import PackCollator, PadCollator, pack_examples
from sparsedoc.data.dataset import ResumableSampler, train_loader
from sparsedoc.data.schema import RecordError, read_jsonl, write_jsonl
from sparsedoc.data.tokenize import (IGNORE_INDEX, TokenizedExample, encode_chat,
                                     tokenize_records)
from sparsedoc.models.load import load_tokenizer, resolve_model_path
from sparsedoc.data.batch import model_inputs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by " \
                 "Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path(ModelCfg()))


def kept(labels):
    return [t for t in labels if t != IGNORE_INDEX]


def spans(labels):
    """(start, end) of every contiguous run of target labels."""
    out, start = [], None
    for i, t in enumerate(labels + [IGNORE_INDEX]):
        if t != IGNORE_INDEX and start is None:
            start = i
        elif t == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


def chat(id_, q, a, lang="en", label="cardiology"):
    return {"id": id_, "messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": a}],
            "meta": {"source": "t", "task": "qa", "lang": lang, "label": label}}


def mcq(id_, lang="en", answer="A", explanation="The heart pumps blood."):
    return {"id": id_, "question": "Which organ pumps blood?" if lang == "en" else "哪个器官泵血？",
            "options": {"A": "heart", "B": "lung", "C": "liver", "D": "skin"}, "answer": answer,
            "explanation": explanation,
            "meta": {"source": "t", "subject": "cardiology", "lang": lang}}


# ---- masking with the real chat template -----------------------------------------------------


def test_two_turn_conversation_keeps_exactly_the_assistant_tokens(tok):
    msgs = [{"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is a heart?"},
            {"role": "assistant", "content": "An organ."}]
    ids, labels = encode_chat(tok, msgs)
    assert len(ids) == len(labels)
    assert tok.decode(ids) == (DEFAULT_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n"
                               "<|im_start|>assistant\nHello!<|im_end|>\n"
                               "<|im_start|>user\nWhat is a heart?<|im_end|>\n"
                               "<|im_start|>assistant\nAn organ.<|im_end|>\n")
    assert tok.decode(kept(labels)) == "Hello!<|im_end|>\nAn organ.<|im_end|>\n"
    runs = spans(labels)
    assert len(runs) == 2
    for (s, e), text in zip(runs, ["Hello!<|im_end|>\n", "An organ.<|im_end|>\n"]):
        assert labels[s:e] == ids[s:e]  # targets are the input tokens themselves
        assert tok.decode(ids[s:e]) == text
        assert tok.decode(ids[:s]).endswith("<|im_start|>assistant\n")  # the prompt is masked
    assert all(t == IGNORE_INDEX for t in labels[: runs[0][0]])
    assert all(t == IGNORE_INDEX for t in labels[runs[0][1]: runs[1][0]])
    assert runs[1][1] == len(ids)  # the last turn's "<|im_end|>\n" is the last token


def test_default_system_prompt_of_the_template_is_masked(tok):
    ids, labels = encode_chat(tok, [{"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A."}])
    n_sys = len(tok(DEFAULT_SYSTEM, add_special_tokens=False)["input_ids"])
    assert tok.decode(ids[:n_sys]) == DEFAULT_SYSTEM
    assert labels[:n_sys] == [IGNORE_INDEX] * n_sys
    assert tok.decode(kept(labels)) == "A.<|im_end|>\n"


def test_configured_system_prompt_replaces_the_default_and_is_masked(tok):
    ids, labels = encode_chat(tok, [{"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A."}],
                              system_prompt="You are a doctor.")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a doctor.<|im_end|>\n")
    assert "SmolLM" not in text
    assert tok.decode(kept(labels)) == "A.<|im_end|>\n"


@pytest.mark.parametrize("lang,with_expl,target", [
    ("en", True, "Answer: A\nExplanation: The heart pumps blood.<|im_end|>\n"),
    ("en", False, "Answer: A<|im_end|>\n"),
    ("zh", True, "答案：A\n解析：The heart pumps blood.<|im_end|>\n"),
    ("zh", False, "答案：A<|im_end|>\n"),
])
def test_mcq_records_train_on_the_answer_letter(tok, lang, with_expl, target):
    out, stats = tokenize_records([mcq("m1", lang)], tok, 512, mcq_with_explanation=with_expl)
    (ex,) = out
    assert tok.decode(kept(ex.labels)) == target
    prompt = tok.decode(ex.input_ids)
    assert "A. heart\nB. lung\nC. liver\nD. skin" in prompt
    assert ("请给出正确选项。" if lang == "zh" else "Answer with the letter") in prompt
    assert ex.label == "cardiology" and ex.record_id == "m1"  # meta.subject is the label
    assert stats.target_tokens == len(kept(ex.labels))


def test_multi_answer_mcq_keeps_all_letters(tok):
    rec = mcq("m2", answer="AC", explanation="")
    (ex,), _ = tokenize_records([rec], tok, 512)
    assert tok.decode(kept(ex.labels)) == "Answer: AC<|im_end|>\n"


def test_truncation_is_counted_and_records_that_cannot_fit_are_skipped_by_id(tok):
    long_answer = chat("long-answer", "Short question?", " ".join(["word"] * 200))
    long_prompt = chat("long-prompt", " ".join(["context"] * 200), "Yes.")
    short = chat("short", "Q?", "A.")
    out, stats = tokenize_records([long_answer, long_prompt, short], tok, max_seq_len=64)
    assert stats.records == 3
    assert stats.truncated == 1 and stats.turns_cut == 1  # one-line prompt: cut inside the turn
    assert list(stats.skipped) == ["long-answer"]
    assert "exceeds max_seq_len=64" in stats.skipped["long-answer"]
    assert [e.record_id for e in out] == ["long-prompt", "short"]
    assert len(out[0].input_ids) <= 64 and tok.decode(kept(out[0].labels)) == "Yes.<|im_end|>\n"
    assert stats.tokens == sum(len(e.input_ids) for e in out)
    assert stats.target_tokens == sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in out)
    assert stats.as_dict()["skipped"] == 1


def test_a_reply_whose_tokens_merge_with_the_template_is_skipped_by_id(tok, tmp_path):
    """A reply that starts with whitespace merges with the template's "assistant\n" token, so
    its tokens cannot be located: that record is skipped and named, the others train. A template
    that breaks every record stops the run, and the message points at the template."""
    from sparsedoc.config import DataCfg
    from sparsedoc.data.dataset import prepare_data

    edgy = chat("edgy", "What helps?", "  Rest and fluids.")
    out, stats = tokenize_records([edgy, chat("plain", "Q?", "A.")], tok, max_seq_len=64)
    assert [e.record_id for e in out] == ["plain"]
    assert "message 1 (assistant)" in stats.skipped["edgy"]
    assert "starts with ' '" in stats.skipped["edgy"]
    f = tmp_path / "train.jsonl"
    write_jsonl(f, [edgy, chat("edgy2", "Q?", "  A.")])
    with pytest.raises(RecordError, match="every record was skipped.*check the model's chat "
                                          "template"):
        prepare_data(DataCfg(train_files=[str(f)], eval_files=[]), tok, seed=0)


def test_memoised_ids_equal_the_library_s_own_tokenize(tok):
    """``chat_ids`` with a memo renders text and tokenizes it itself; on the bundled records and
    every prefix the fitting loop renders, that equals ``apply_chat_template(tokenize=True)``."""
    from sparsedoc.data.tokenize import chat_ids, to_chat

    memo: dict = {}
    records = read_jsonl(REPO / "sparsedoc" / "prep" / "demo" / "train.jsonl")[::8]
    for rec in records:
        msgs = to_chat(rec)["messages"]
        for n in range(1, len(msgs) + 1):
            for gen in (False, True):
                lib = list(tok.apply_chat_template(msgs[:n], tokenize=True,
                                                   add_generation_prompt=gen)["input_ids"])
                assert chat_ids(tok, msgs[:n], gen, memo) == lib
    assert len(memo) >= len(records)


# ---- target-preserving truncation -----------------------------------------------------------

INTRO = "Here is the transcript of a doctor-patient encounter:"
ASK = "Write the full clinical visit note for this encounter."


def dialogue_record(id_, n_turns, note):
    turns = [f"[{'doctor' if i % 2 == 0 else 'patient'}] turn {i}: " + "words " * (5 + i % 7)
             for i in range(n_turns)]
    user = "\n".join([INTRO, ""] + turns + ["", ASK])
    return chat(id_, user, note), turns


def rendered_ids(tok, messages):
    """Direct count: the template's text, tokenized as plain text."""
    text = tok.apply_chat_template(messages, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def kept_user_lines(tok, ids):
    text = tok.decode(ids)
    user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    return user.split("\n")


def test_long_dialogue_keeps_its_whole_note_and_drops_middle_turns(tok):
    note = "CHIEF COMPLAINT\n\nKnee pain.\n\nASSESSMENT AND PLAN\n\n" + "Rest and ice. " * 40
    rec, turns = dialogue_record("enc-1", 120, note)
    full_len = len(rendered_ids(tok, rec["messages"]))
    max_len = 512
    assert full_len > 2 * max_len  # the record really is too long
    out, stats = tokenize_records([rec], tok, max_seq_len=max_len)
    (ex,) = out
    assert len(ex.input_ids) <= max_len
    # the note is whole: the target tokens are exactly the tokenizer's tokens of the note
    note_ids = tok(note + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert kept(ex.labels) == note_ids
    # whole turns went, from the middle: the start and the most recent turns stay, in order
    lines = kept_user_lines(tok, ex.input_ids)
    assert lines[:2] == [INTRO, ""] and lines[-2:] == ["", ASK]
    kept_turns = lines[2:-2]
    assert all(t in turns for t in kept_turns)  # no turn was cut inside
    n_head = next(i for i, t in enumerate(kept_turns) if t != turns[i])
    n_tail = len(kept_turns) - n_head
    assert n_head >= 1 and n_tail >= 1
    assert kept_turns == turns[:n_head] + turns[len(turns) - n_tail:]
    assert n_tail > n_head  # most of the budget goes to the most recent turns
    assert stats.truncated == 1 and stats.turns_cut == 0 and not stats.skipped
    assert stats.turns_dropped == len(turns) - len(kept_turns)
    # and it keeps as much as fits: the next dropped turn would not have fitted
    with_next = "\n".join([INTRO, ""] + turns[:n_head + 1] + turns[len(turns) - n_tail:]
                          + ["", ASK])
    longer = rendered_ids(tok, [{"role": "user", "content": with_next},
                                {"role": "assistant", "content": note}])
    assert len(longer) > max_len - 16


def test_a_note_longer_than_max_target_len_is_skipped_and_named(tok, tmp_path):
    from sparsedoc.config import DataCfg
    from sparsedoc.data.dataset import prepare_data

    long_note = "Plan: " + "follow up in two weeks. " * 60
    note_len = len(tok(long_note, add_special_tokens=False)["input_ids"])
    rec_long, _ = dialogue_record("enc-long-note", 4, long_note)
    assert len(rendered_ids(tok, rec_long["messages"])) < 512  # fits whole, note and all
    rec_ok, _ = dialogue_record("enc-ok", 200, "Short note.")
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [rec_long, rec_ok])
    cfg = DataCfg(train_files=[str(path)], eval_files=[], max_seq_len=512,
                  max_target_len=note_len // 2)
    data = prepare_data(cfg, tok, seed=0)
    assert [e.record_id for e in data.train] == ["enc-ok"]
    assert data.stats["train"]["skipped"] == 1 and data.stats["train"]["truncated"] == 1
    why = data.stats["skipped_ids"]["train"]["enc-long-note"]
    assert f"exceeds max_target_len={note_len // 2}" in why
    # the same record is kept whole when the target may be longer
    out, stats = tokenize_records([rec_long], tok, max_seq_len=512)
    assert not stats.skipped and stats.truncated == 0 and len(out) == 1


def test_multi_turn_chat_drops_whole_middle_exchanges(tok):
    msgs = []
    for i in range(12):
        msgs += [{"role": "user", "content": f"Question {i}: " + "detail " * 30},
                 {"role": "assistant", "content": f"Answer {i}: " + "reply " * 30}]
    rec = {"id": "multi", "messages": msgs,
           "meta": {"source": "t", "task": "qa", "lang": "en"}}
    (ex,), stats = tokenize_records([rec], tok, max_seq_len=400)
    text = tok.decode(ex.input_ids)
    kept_q = [i for i in range(12) if f"Question {i}:" in text]
    kept_a = [i for i in range(12) if f"Answer {i}:" in text]
    assert kept_q == kept_a  # exchanges go as pairs: the roles still alternate
    assert kept_q[0] == 0 and kept_q[-2:] == [10, 11]
    assert kept_q[1:] == list(range(kept_q[1], 12))  # one gap, after the first exchange
    for i in kept_a[:-1]:  # the earlier answers kept are trained on: they stay whole
        assert msgs[2 * i + 1]["content"] in text
    assert stats.turns_dropped == 2 * (12 - len(kept_q))
    assert tok.decode(kept(ex.labels)).endswith(msgs[-1]["content"] + "<|im_end|>\n")
    assert len(ex.input_ids) <= 400


def test_packing_never_splits_a_record(tok):
    from sparsedoc.data.collate import pack_examples

    recs = [dialogue_record(f"enc-{i}", 1 + 4 * (i % 5), f"Note {i}. " * (3 + i))[0]
            for i in range(12)]
    examples, stats = tokenize_records(recs, tok, max_seq_len=300)
    assert stats.truncated > 0 and not stats.skipped
    rows = pack_examples(examples, 300)
    assert len(rows) < len(examples)
    by_start = 0
    for row in rows:
        # the row is a run of consecutive whole records, each with its own length
        lengths = [n for _, n in row.pieces]
        members = examples[by_start:by_start + len(lengths)]
        assert lengths == [len(e.input_ids) for e in members]
        assert row.input_ids == [t for e in members for t in e.input_ids]
        assert len(row.input_ids) <= 300
        by_start += len(lengths)
    assert by_start == len(examples)
    too_long = TokenizedExample(list(range(301)), list(range(301)), None, "big")
    with pytest.raises(ValueError, match="record big: 301 tokens.*never split"):
        pack_examples(examples[:2] + [too_long], 300)


# ---- schema errors ---------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(chat("a", "q", "a"))
    path.write_text(good + "\n\n" + '{"id": "b", "messages": [\n' + good + "\n")
    with pytest.raises(RecordError) as e:
        read_jsonl(path)
    assert f"{path}:3" in str(e.value) and "not valid JSON" in str(e.value)


def test_record_missing_meta_lang_names_the_field(tmp_path):
    rec = chat("a", "q", "a")
    del rec["meta"]["lang"]
    path = tmp_path / "nolang.jsonl"
    write_jsonl(path, [chat("ok", "q", "a"), rec])
    with pytest.raises(RecordError) as e:
        read_jsonl(path)
    assert f"{path}:2" in str(e.value) and "meta.lang" in str(e.value)


def test_duplicate_ids_are_an_error(tmp_path):
    path = tmp_path / "dup.jsonl"
    write_jsonl(path, [chat("x", "q1", "a1"), chat("y", "q2", "a2"), chat("x", "q3", "a3")])
    with pytest.raises(RecordError, match=r"duplicate id 'x' \(records 1 and 3\)"):
        read_jsonl(path)


def test_mcq_answer_outside_options_is_rejected(tmp_path):
    path = tmp_path / "mcq.jsonl"
    write_jsonl(path, [mcq("m", answer="E")])
    with pytest.raises(RecordError, match=rf"{path}:1: field 'answer'"):
        read_jsonl(path)


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_jsonl(tmp_path / "none.jsonl")


# ---- collation and packing -------------------------------------------------------------------


def test_pad_collator_pads_with_ignored_labels_and_zero_attention():
    a = TokenizedExample([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9], "cardiology", "a")
    b = TokenizedExample(list(range(10, 21)), [-100] * 6 + list(range(16, 21)), "other", "b")
    batch = PadCollator(pad_token_id=2, label_vocab={"cardiology": 0, "neurology": 1})([a, b])
    assert batch["input_ids"].shape == (2, 16)  # 11 rounded up to a multiple of 8
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9] + [2] * 11
    assert batch["labels"][0].tolist() == [-100, -100, 7, 8, 9] + [-100] * 11
    assert batch["attention_mask"].sum(1).tolist() == [5, 11]
    assert batch["attention_mask"][0, 5:].eq(0).all()
    assert batch["attention_mask"][1, 11:].eq(0).all()
    assert batch["labels"][1, 11:].eq(-100).all()
    assert batch["record_label_ids"].tolist() == [0, -1]  # unknown label -> -1
    assert batch["record_ids"][0].tolist() == [0] * 5 + [-1] * 11
    assert batch["record_ids"][1].tolist() == [1] * 11 + [-1] * 5


@pytest.fixture(scope="module")
def toy_examples(tok, toy_data):
    examples, _ = tokenize_records(read_jsonl(toy_data[0]), tok, max_seq_len=128)
    return examples


def test_packed_rows_fit_and_keep_every_token_in_order(toy_examples):
    rows = pack_examples(toy_examples, 128)
    assert len(rows) < len(toy_examples)
    assert max(len(r.input_ids) for r in rows) <= 128
    assert [t for r in rows for t in r.input_ids] == [t for e in toy_examples for t in e.input_ids]
    # positions restart at every packed record; each record's first label is masked
    pieces = [len(e.input_ids) for e in toy_examples]
    flat_pos = [p for r in rows for p in r.position_ids]
    assert flat_pos == [i for n in pieces for i in range(n)]
    flat_labels = [t for r in rows for t in r.labels]
    starts = [sum(pieces[:i]) for i in range(len(pieces))]
    assert all(flat_labels[s] == IGNORE_INDEX for s in starts)
    assert len(rows) == len(set(r.record_id for r in rows))


def test_packed_batch_keeps_each_records_label(toy_examples):
    """record_ids / record_label_ids of a packed batch: every record, its own label, its own
    tokens, in order (not the row's first label)."""
    vocab = {"cardiology": 0, "neurology": 1}
    rows = pack_examples(toy_examples[:6], 128)
    batch = PackCollator(pad_token_id=0, label_vocab=vocab)(rows)
    assert batch["record_label_ids"].tolist() == [vocab[e.label] for e in toy_examples[:6]]
    ids = batch["record_ids"]
    for i, row in enumerate(rows):
        expect = [r for r, (_, n) in enumerate(row.pieces, start=sum(
            len(x.pieces) for x in rows[:i])) for _ in range(n)]
        assert ids[i, :len(row.input_ids)].tolist() == expect
        assert ids[i, len(row.input_ids):].eq(-1).all()
    lengths = torch.bincount(ids[ids >= 0])
    assert lengths.tolist() == [len(e.input_ids) for e in toy_examples[:6]]


def test_packed_row_forward_equals_separate_forwards(tiny_model_dir, tok, toy_examples):
    """Block-diagonal attention from restarting positions: no record sees another."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = pack_examples(toy_examples, 256)
    row = max(rows, key=lambda r: r.position_ids.count(0))
    n_pieces = row.position_ids.count(0)
    assert n_pieces >= 3
    pieces = toy_examples[[e.record_id for e in toy_examples].index(row.record_id):][:n_pieces]
    assert [t for e in pieces for t in e.input_ids] == row.input_ids

    batch = PackCollator(tok.pad_token_id)([row])
    inputs = model_inputs(batch)
    assert "attention_mask" not in inputs
    assert batch["position_ids"][0, : len(row.input_ids)].tolist() == row.position_ids
    with torch.no_grad():
        packed = model(**inputs)
        offset, loss_sum, n_sum = 0, 0.0, 0
        for e in pieces:
            alone = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            got = packed.logits[0, offset: offset + len(e.input_ids)]
            torch.testing.assert_close(got, alone.logits[0], atol=1e-4, rtol=0)
            n = sum(t != IGNORE_INDEX for t in e.labels[1:])
            loss_sum, n_sum = loss_sum + float(alone.loss) * n, n_sum + n
            offset += len(e.input_ids)
    # the packed loss is the token-weighted mean of the separate losses
    assert float(packed.loss) == pytest.approx(loss_sum / n_sum, abs=1e-4)


# ---- the resumable sampler -------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [None, [(i * 7) % 23 for i in range(50)]],
                         ids=["shuffled", "grouped-by-length"])
def test_sampler_shards_disjoint_equal_and_seeded(lengths):
    def make(rank, seed=0):
        return ResumableSampler(50, batch_size=4, rank=rank, world_size=2, seed=seed,
                                lengths=lengths)

    r0, r1 = make(0), make(1)
    assert r0.batches_per_epoch == 50 // 8
    a, b = list(r0), list(r1)
    assert len(a) == len(b) == 6 * 4 == len(r0)
    assert not set(a) & set(b)
    assert len(set(a) | set(b)) == 48 and set(a) | set(b) <= set(range(50))
    assert list(make(0)) == a  # same (seed, epoch): same order
    r0.set_position(1)
    r1.set_position(1)
    a1, b1 = list(r0), list(r1)
    assert a1 != a  # another epoch: another order
    assert not set(a1) & set(b1) and len(a1) == len(b1) == 24  # still disjoint and equal
    other_seed = make(0, seed=1)
    assert list(other_seed) != a


def test_sampler_set_position_yields_the_tail_of_the_epoch():
    s = ResumableSampler(50, batch_size=4, rank=1, world_size=2, seed=3)
    s.set_position(2)
    whole = list(s)
    s.set_position(2, 3)
    assert list(s) == whole[3 * 4:]
    assert len(s) == (6 - 3) * 4


def test_sampler_epoch_orders_differ_and_repeat():
    s = ResumableSampler(40, batch_size=4, rank=0, world_size=1, seed=0)
    orders = []
    for epoch in (0, 1, 0):
        s.set_position(epoch)
        orders.append(list(s))
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(40))


def test_sampler_rejects_fewer_rows_than_a_global_batch():
    with pytest.raises(ValueError, match="lower train.micro_batch_size"):
        ResumableSampler(7, batch_size=4, rank=0, world_size=2)


def test_resumed_loader_gives_the_remaining_batches_of_the_epoch(toy_examples, tok):
    collate = PadCollator(tok.pad_token_id)
    loader = train_loader(toy_examples, collate, batch_size=4, rank=0, world_size=2, seed=5)
    loader.sampler.set_position(1, 0)
    whole = [b["input_ids"] for b in loader]
    assert len(whole) == len(toy_examples) // 8
    loader.sampler.set_position(1, 2)
    tail = [b["input_ids"] for b in loader]
    assert len(tail) == len(whole) - 2
    for x, y in zip(tail, whole[2:]):
        assert torch.equal(x, y)


def test_earlier_answers_are_never_shortened_only_the_users_turns(tok):
    """Every assistant turn is trained on, so shortening one would teach a broken answer."""
    answer = "\n".join(f"answer line {i} with the longer explanation" for i in range(40))
    msgs = [{"role": "user", "content": "\n".join(f"first question line {i}" for i in range(40))},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "\n".join(f"second question line {i}" for i in range(40))},
            {"role": "assistant", "content": "The final note."}]
    rec = {"id": "two-turns", "messages": msgs, "meta": {"source": "t", "task": "qa", "lang": "en"}}
    full = len(rendered_ids(tok, msgs))
    (ex,), stats = tokenize_records([rec], tok, max_seq_len=full - 150)  # the answer is the
    # longest turn: the first one a rule that shortened every prompt-side turn would cut
    text = tok.decode(ex.input_ids)
    assert answer in text  # the earlier answer whole
    assert stats.turns_dropped > 0 and len(ex.input_ids) <= full - 150
    assert tok.decode(kept(ex.labels)).count("answer line") == 40
