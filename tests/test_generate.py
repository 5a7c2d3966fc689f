"""``sparsedoc generate`` / ``sparsedoc chat`` on the tiny random Llama (real SmolLM2 tokenizer)."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from sparsedoc import cli
from sparsedoc import generate as gen
from sparsedoc.loader import load_trained

MSGS = [{"role": "user", "content": "What does a cardiologist treat?"}]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with an untied random LM head. With tied embeddings a random model
    repeats the prompt's last token (here the template's "\n", which strips to an empty reply,
    so reply comparisons would prove nothing); an untied head writes varied text."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-untied")
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(model_dir):
    model, tokenizer, _ = load_trained(str(model_dir), "fp32", "cpu")
    return model, tokenizer


def test_greedy_reply_equals_hand_made_generate(tiny):
    model, tok = tiny
    opts = gen.GenerationOptions(max_new_tokens=12)
    reply = gen.generate_reply(model, tok, MSGS, opts)

    enc = tok.apply_chat_template(MSGS, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         do_sample=False, max_new_tokens=12, eos_token_id=[tok.eos_token_id, eot],
                         pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    assert gen.build_chat_inputs(tok, MSGS)["input_ids"].tolist() == enc["input_ids"].tolist()
    assert reply and reply == expected
    assert gen.generate_reply(model, tok, MSGS, opts) == reply


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, tok = tiny
    opts = gen.GenerationOptions(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50,
                                 seed=3)
    first = gen.generate_reply(model, tok, MSGS, opts)
    torch.rand(5)  # whatever ran in between, the seed fixes the sample
    assert gen.generate_reply(model, tok, MSGS, opts) == first
    # The random head is close to uniform over 49k tokens: a sample never matches greedy.
    assert first != gen.generate_reply(model, tok, MSGS, gen.GenerationOptions(12))


def test_stop_tokens_include_the_template_end_of_turn(tiny):
    model, tok = tiny
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen.stop_token_ids(model, tok)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0},
                                 {"top_k": -1}])
def test_options_reject_bad_values(bad):
    with pytest.raises(ValueError):
        gen.GenerationOptions(**bad)


def test_cli_generate_prints_the_reply(tiny, model_dir, capsys):
    model, tok = tiny
    expected = gen.generate_reply(model, tok, [{"role": "user", "content": "hi"}],
                                  gen.GenerationOptions(max_new_tokens=5))
    rc = cli.main(["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "5",
                   "--no-stream", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out == expected + "\n"


def test_cli_generate_streams_the_reply(tiny, model_dir, capsys):
    model, tok = tiny
    expected = gen.generate_reply(model, tok, [{"role": "user", "content": "hi"}],
                                  gen.GenerationOptions(max_new_tokens=5))
    assert cli.main(["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "5",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_cli_generate_prompt_file_to_jsonl(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nwhat is a stroke?\n")
    out = tmp_path / "preds.jsonl"
    assert cli.main(["generate", str(model_dir), "--prompt-file", str(prompts), "--out",
                     str(out), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello there", "what is a stroke?"]
    assert all(isinstance(r["output"], str) for r in rows)


def test_cli_generate_jsonl_records_drop_the_final_assistant_turn(model_dir, tmp_path,
                                                                  monkeypatch):
    seen = []
    real = gen.build_chat_inputs
    monkeypatch.setattr(gen, "build_chat_inputs",
                        lambda tok, msgs: seen.append(msgs) or real(tok, msgs))
    rec = {"id": "r1", "messages": [{"role": "user", "content": "chest pain?"},
                                    {"role": "assistant", "content": "GOLD ANSWER"}],
           "meta": {"source": "toy", "task": "qa", "lang": "en"}}
    src = tmp_path / "recs.jsonl"
    src.write_text(json.dumps(rec) + "\n")
    out = tmp_path / "preds.jsonl"
    assert cli.main(["generate", str(model_dir), "--prompt-file", str(src), "--out",
                     str(out), "--max-new-tokens", "3", "--device", "cpu", "--system",
                     "Be brief."]) == 0
    assert seen == [[{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "chest pain?"}]]
    row = json.loads(out.read_text())
    assert row["id"] == "r1" and row["prompt"] == "chest pain?"


def scripted_input(lines):
    """An ``input`` that answers with ``lines`` and then signals EOF (Ctrl-D)."""
    it = iter(lines)

    def fake_input(prompt=""):
        assert prompt == "you> "
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return fake_input


def test_cli_chat_reset_clears_history(model_dir, monkeypatch):
    seen, replies = [], []
    real_inputs, real_reply = gen.build_chat_inputs, gen.generate_reply
    monkeypatch.setattr(gen, "build_chat_inputs",
                        lambda tok, msgs: seen.append(msgs) or real_inputs(tok, msgs))
    monkeypatch.setattr(gen, "generate_reply",
                        lambda *a, **k: replies.append(real_reply(*a, **k)) or replies[-1])
    monkeypatch.setattr(builtins, "input",
                        scripted_input(["hello", "more", "/reset", "/system Be kind.", "again"]))
    assert cli.main(["chat", str(model_dir), "--max-new-tokens", "3", "--no-stream",
                     "--device", "cpu"]) == 0
    assert len(seen) == 3
    assert seen[0] == [{"role": "user", "content": "hello"}]
    assert seen[1] == [{"role": "user", "content": "hello"},
                       {"role": "assistant", "content": replies[0]},
                       {"role": "user", "content": "more"}]
    assert seen[2] == [{"role": "system", "content": "Be kind."},
                       {"role": "user", "content": "again"}]


def test_cli_chat_interrupted_reply_keeps_the_session(model_dir, monkeypatch, capsys):
    seen = []
    real = gen.generate_reply

    def interrupted_once(model, tok, msgs, opts, streamer=None):
        seen.append(msgs)
        if len(seen) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first reply streams
        return real(model, tok, msgs, opts, streamer)

    monkeypatch.setattr(gen, "generate_reply", interrupted_once)
    monkeypatch.setattr(builtins, "input", scripted_input(["first", "second"]))
    assert cli.main(["chat", str(model_dir), "--max-new-tokens", "2", "--device",
                     "cpu"]) == 0
    assert seen[1] == [{"role": "user", "content": "second"}]
    assert "interrupted" in capsys.readouterr().err


def test_cli_missing_model_path(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert cli.main(["generate", str(missing), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.startswith("error:") and "Traceback" not in err


def test_cli_existing_folder_that_is_no_model(tmp_path, capsys):
    assert cli.main(["chat", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_cli_empty_prompt_and_conflicting_sources(model_dir, tmp_path, capsys):
    assert cli.main(["generate", str(model_dir), "--prompt", "  "]) == 2
    assert "empty prompt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert cli.main(["generate", str(model_dir), "--prompt-file", str(empty)]) == 2
    assert "empty prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(model_dir), "--prompt", "hi", "--prompt-file",
                  str(empty)])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_prompt_from_stdin(model_dir, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert cli.main(["generate", str(model_dir), "--prompt", "-", "--max-new-tokens", "5",
                     "--no-stream", "--device", "cpu"]) == 0
    out_stdin = capsys.readouterr().out
    assert cli.main(["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "5",
                     "--no-stream", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == out_stdin
