"""Bad input gets one clear message (it names the file or the key and says what was expected),
exit status 2 and no run folder: configs, data files, model paths, DeepSpeed JSON and checkpoint
folders, each case through the real training command line (``run_recipe``, what ``sparsedoc
train`` calls). The whole table runs in one child process, so the process group and the
environment that training sets up never leak into the test session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedoc.data.schema import write_jsonl

REPO = Path(__file__).resolve().parents[1]
CHINESE = {"id": "zh-1", "messages": [{"role": "user", "content": "患者胸痛三天，心电图提示什么？"},
                                      {"role": "assistant", "content": "提示心肌缺血，建议住院。"}],
           "meta": {"source": "toy", "task": "qa", "lang": "zh", "label": "cardiology"}}

DRIVER = r'''
import contextlib, io, json, sys, traceback
from sparsedoc.train.recipe import run_recipe
results = {}
for case in json.load(open(sys.argv[1])):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            run_recipe(case["method"], case["argv"])
        results[case["name"]] = {"code": 0, "err": err.getvalue()}
    except SystemExit as e:
        results[case["name"]] = {"code": e.code, "err": err.getvalue()}
    except BaseException:
        results[case["name"]] = {"code": "traceback", "err": traceback.format_exc()}
json.dump(results, open(sys.argv[2], "w"))
'''


def _files(root: Path, toy: tuple[Path, Path], model: Path) -> dict[str, Path]:
    """Every bad file the table points at."""
    train, _ = toy
    lines = train.read_text(encoding="utf-8").splitlines()
    f: dict[str, Path] = {}

    def put(name: str, data: bytes | str) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        f[name] = path
        return path

    put("truncated.jsonl", "\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    put("gbk.jsonl", "".join(json.dumps(dict(CHINESE, id=f"zh-{i}"), ensure_ascii=False) + "\n"
                             for i in range(8)).encode("gb18030"))
    no_meta = json.loads(lines[0])
    del no_meta["meta"]
    put("no_meta.jsonl", "\n".join([json.dumps(no_meta)] + lines[1:]) + "\n")
    put("empty.jsonl", "\n")
    one_label = [dict(json.loads(x), meta={"source": "toy", "task": "qa", "lang": "en",
                                           "label": "cardiology"}) for x in lines
                 if "messages" in x]
    write_jsonl(put("one_label.jsonl", ""), one_label)
    put("bad.yaml", "train:\n  lr: [1e-4\n")
    put("gbk.yaml", "train:\n  output_dir: 运行\n".encode("gb18030"))
    for name, ds in {"ds_batch.json": {"train_batch_size": 32},
                     "ds_offload_z2.json": {"zero_optimization": {"stage": 2,
                                                                  "offload_param": {"device": "cpu"}}},
                     "ds_z3_sum.json": {"zero_optimization": {"stage": 3},
                                        "gradient_allreduce_op": "sum"},
                     "ds_typo.json": {"zero_optimization": {"stage": 2, "stgae": 3}},
                     "ds_array.json": [{"zero_optimization": {"stage": 2}}],
                     "ds_nvme.json": {"zero_optimization": {"stage": 3,
                                                            "offload_param": {"device": "nvme"}}}
                     }.items():
        put(name, json.dumps(ds))
    put("ds_not_json.json", '{"zero_optimization": {"stage": 2,}')
    put("not_a_model/README.md", "a folder of notes")
    for name in ("no_template", "truncated_weights", "missing_shard", "seq2seq"):
        shutil.copytree(model, root / name)
        f[name] = root / name
    (root / "no_template" / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((root / "no_template" / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (root / "no_template" / "tokenizer_config.json").write_text(json.dumps(tc))
    w = root / "truncated_weights" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    (root / "missing_shard" / "model.safetensors").rename(
        root / "missing_shard" / "model-00001-of-00002.safetensors")
    (root / "missing_shard" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    cfg = json.loads((root / "seq2seq" / "config.json").read_text())
    (root / "seq2seq" / "config.json").write_text(json.dumps(
        {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
         "vocab_size": cfg["vocab_size"], "d_model": 64, "num_layers": 1, "num_heads": 2,
         "is_encoder_decoder": True}))
    # a run whose checkpoints/latest names a checkpoint that is not there (a half copy)
    ckpt = root / "halfrun" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    (root / "halfrun" / "checkpoints" / "latest").write_text("step-000009")
    f["halfrun"] = root / "halfrun"
    return f


# (case, method, config overrides / flags given the files, expected message regex)
CASES = [
    # configs
    ("wrong type", "lora", lambda f: ["train.lr=abc"],
     r"train\.lr: expected a finite number, got 'abc'"),
    ("not a number", "lora", lambda f: ["train.lr=nan"], r"train\.lr: expected a finite number"),
    ("unknown key", "lora", lambda f: ["train.lrr=1"],
     r"unknown config key 'train\.lrr'; valid keys of train: \["),
    ("top_k > num_experts", "lora_moe", lambda f: ["adapter.moe.num_experts=2",
                                                   "adapter.moe.top_k=3"],
     r"adapter\.moe\.top_k: expected 1 <= top_k <= num_experts \(2\), got 3"),
    ("FFN mode with top_k=1", "lora_moe", lambda f: ["adapter.moe.mode=ffn", "adapter.moe.top_k=1"],
     r"adapter\.moe\.top_k: mode=ffn needs top_k >= 2"),
    ("YAML syntax error", "lora", lambda f: ["--config", str(f["bad.yaml"])],
     r"bad\.yaml:\d+: not valid YAML"),
    ("config not UTF-8", "lora", lambda f: ["--config", str(f["gbk.yaml"])],
     r"gbk\.yaml: not UTF-8 text .*save the config as UTF-8"),
    ("packing with a seq2seq model", "lora",
     lambda f: [f"model.name_or_path={f['seq2seq']}", "data.packing=true"],
     r"data\.packing=true: packed rows need a decoder-only model; the model is an "
     r"encoder-decoder"),
    # data files
    ("truncated JSONL", "lora", lambda f: [f"data.train_files=[{f['truncated.jsonl']}]"],
     r"truncated\.jsonl:48: not valid JSON \(.*\) \(the file ends mid-record: truncated\?\)"),
    ("GBK-encoded JSONL", "lora", lambda f: [f"data.train_files=[{f['gbk.jsonl']}]"],
     r"gbk\.jsonl:1: not utf-8 text \(byte 0x\w\w at offset \d+\); it reads as GB18030/GBK-"
     r"encoded Chinese: set data\.encoding=gb18030"),
    ("unknown encoding", "lora", lambda f: [f"data.train_files=[{f['gbk.jsonl']}]",
                                           "data.encoding=klingon"],
     r"gbk\.jsonl: unknown text encoding 'klingon' \(data\.encoding\)"),
    ("missing field", "lora", lambda f: [f"data.train_files=[{f['no_meta.jsonl']}]"],
     r"no_meta\.jsonl:1: field 'meta': expected an object, got nothing \(the field is missing\)"),
    ("empty train split", "lora", lambda f: [f"data.train_files=[{f['empty.jsonl']}]"],
     r"data\.train_files: .*empty\.jsonl holds no records \(an empty split\)"),
    ("empty eval split", "lora", lambda f: [f"data.eval_files=[{f['empty.jsonl']}]"],
     r"data\.eval_files: .*empty\.jsonl holds no records"),
    ("missing data file", "lora", lambda f: ["data.train_files=[/nonexistent/train.jsonl]"],
     r"/nonexistent/train\.jsonl: no such data file"),
    ("one label, label contrast on", "lora_moe",
     lambda f: [f"data.train_files=[{f['one_label.jsonl']}]", "adapter.moe.contrastive=label"],
     r"adapter\.moe\.contrastive=label contrasts records by label, but the records of "
     r"data\.train_files carry 1 distinct label\(s\) .*: only 'cardiology'; expected >= 2"),
    ("every record too long", "lora", lambda f: ["data.max_seq_len=16"],
     r"data\.train_files: every record was skipped while tokenizing"),
    ("batch larger than the data", "lora", lambda f: ["train.micro_batch_size=1000"],
     r"train\.micro_batch_size: \d+ training rows are fewer than one global micro-batch"),
    # model paths
    ("model path missing", "lora", lambda f: ["model.name_or_path=/nonexistent/model"],
     r"model\.name_or_path=/nonexistent/model: no such folder"),
    ("not a model", "lora", lambda f: [f"model.name_or_path={f['not_a_model/README.md'].parent}"],
     r"not_a_model: not a model folder, no config\.json"),
    ("no chat template", "lora", lambda f: [f"model.name_or_path={f['no_template']}"],
     r"no_template: its tokenizer has no chat template"),
    ("truncated weights", "lora", lambda f: [f"model.name_or_path={f['truncated_weights']}"],
     r"truncated_weights: weights unreadable: model\.safetensors: .*truncated"),
    ("missing shard", "lora", lambda f: [f"model.name_or_path={f['missing_shard']}"],
     r"missing_shard: weights missing: model-00002-of-00002\.safetensors"),
    # DeepSpeed JSON
    ("batch sizes do not multiply", "lora", lambda f: ["--ds", str(f["ds_batch.json"]),
                                                       "train.micro_batch_size=4"],
     r"ds_batch\.json\.train_batch_size is 32 but it must be train\.micro_batch_size 4 x "
     r"train\.grad_accum 1 x 1 rank\(s\) = 4"),
    ("offload_param under ZeRO-2", "lora", lambda f: ["--ds", str(f["ds_offload_z2.json"])],
     r"offload_param: offloading parameters needs ZeRO stage 3"),
    ("allreduce sum under ZeRO-3", "lora", lambda f: ["--ds", str(f["ds_z3_sum.json"])],
     r"DeepSpeed rejects it: gradient_allreduce_op='sum' is not supported with ZeRO stage 3"),
    ("misspelt ZeRO key", "lora", lambda f: ["--ds", str(f["ds_typo.json"])],
     r"ds_typo\.json: DeepSpeed rejects it: zero_optimization\.stgae: Extra inputs"),
    ("NVMe offload without a path", "lora", lambda f: ["--ds", str(f["ds_nvme.json"])],
     r"offload_param: device nvme needs nvme_path"),
    ("DeepSpeed JSON not JSON", "lora", lambda f: ["--ds", str(f["ds_not_json.json"])],
     r"ds_not_json\.json: not valid JSON"),
    ("DeepSpeed JSON an array", "lora", lambda f: ["--ds", str(f["ds_array.json"])],
     r"ds_array\.json: expected a JSON object of DeepSpeed settings, got list"),
    ("DeepSpeed JSON missing", "lora", lambda f: ["--ds", "/nonexistent/ds.json"],
     r"DeepSpeed config not found: /nonexistent/ds\.json"),
    # checkpoint folders (the resume path; the loader's cases are in test_bad_checkpoints)
    ("resume from nowhere", "lora", lambda f: ["train.resume_from=/nonexistent/step-000002"],
     r"train\.resume_from=/nonexistent/step-000002: not a complete sparsedoc checkpoint"),
    ("latest pointing nowhere", "lora",
     lambda f: [f"train.output_dir={f['halfrun']}", "train.resume_from=auto"],
     r"checkpoints/latest names 'step-000009', which is not a complete checkpoint .*"
     r"\(complete ones: step-000002\)"),
]


@pytest.fixture(scope="module")
def results(tiny_model_dir, toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    f = _files(root, toy_data, tiny_model_dir)
    train, evals = toy_data
    cases = []
    for i, (name, method, args, _) in enumerate(CASES):
        base = [f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{train}]",
                f"data.eval_files=[{evals}]", f"train.output_dir={root / f'run{i}'}",
                "train.max_steps=1", "logging.wandb=false"]
        cases.append({"name": name, "method": method, "argv": base + args(f)})
    (root / "cases.json").write_text(json.dumps(cases))
    (root / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    before = sorted(p.relative_to(root) for p in f["halfrun"].rglob("*"))
    proc = subprocess.run([sys.executable, str(root / "driver.py"), str(root / "cases.json"),
                           str(root / "results.json")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = sorted(p.relative_to(root) for p in f["halfrun"].rglob("*"))
    return root, json.loads((root / "results.json").read_text()), before == after


@pytest.mark.parametrize("name,method,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_clear_message(results, name, method, args, expected):
    root, got, halfrun_untouched = results
    r = got[name]
    assert r["code"] == 2, r["err"][-3000:]
    assert "Traceback" not in r["err"], r["err"][-3000:]
    message = r["err"].strip().splitlines()[-1]  # above it: at most progress bars
    assert message.startswith("error: "), r["err"][-3000:]
    import re
    assert re.search(expected, message), message
    i = [c[0] for c in CASES].index(name)
    if name == "latest pointing nowhere":
        assert halfrun_untouched  # the run folder it refused gained no file
    else:
        assert not (root / f"run{i}").exists()  # nothing half-written


def test_the_command_line_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sparsedoc.cli", "train", "lora",
                           "train.lr=abc", f"train.output_dir={tmp_path / 'run'}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: train.lr: expected a finite number, got 'abc' (in " + \
        str(REPO / "sparsedoc" / "recipes" / "configs" / "lora_demo.yaml") + ")"
    assert not (tmp_path / "run").exists()


def test_a_gbk_file_reads_when_the_encoding_is_named(tmp_path):
    from sparsedoc.config import DataCfg
    from sparsedoc.data.dataset import split_records

    path = tmp_path / "gbk.jsonl"
    path.write_bytes((json.dumps(CHINESE, ensure_ascii=False) + "\n").encode("gb18030"))
    train, _ = split_records(DataCfg(train_files=[str(path)], eval_files=[],
                                     encoding="gb18030"), seed=0)
    assert train == [CHINESE]
    bom = tmp_path / "bom.jsonl"  # a UTF-8 byte-order mark (Windows editors) is no error
    bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(CHINESE, ensure_ascii=False) + "\n").encode())
    assert split_records(DataCfg(train_files=[str(bom)], eval_files=[]), seed=0)[0] == [CHINESE]


def _lora_checkpoint(root: Path, model_dir: Path) -> Path:
    """A lora checkpoint folder as training writes it, its adapter weights from peft."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ckpt = root / "run" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(ckpt / "adapter", safe_serialization=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 2}))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"name_or_path": str(model_dir)}, "adapter": {"method": "lora"}}))
    return ckpt


def test_bad_checkpoint_folders_are_refused_by_the_loader(tmp_path, tiny_model_dir, capsys):
    """Export (like evaluate and generate) loads through sparsedoc.loader: a truncated adapter
    is named; a ZeRO checkpoint missing a rank's shard is refused before DeepSpeed reads it."""
    from sparsedoc.artifacts import ArtifactError
    from sparsedoc.checkpoint import load_checkpoint
    from sparsedoc.cli import main

    ckpt = _lora_checkpoint(tmp_path, tiny_model_dir)
    w = ckpt / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("export FAILED: ") and "adapter: weights unreadable: " \
        "adapter_model.safetensors" in err and "truncated" in err, err
    assert not (tmp_path / "out").exists()

    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"")  # names only: refused before reading
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ArtifactError, match=r"cannot resume, optimizer shards missing for "
                                            r"rank\(s\) \[1\] of the 2 that saved it"):
        load_checkpoint(None, ckpt, rank=0, exclude_frozen=True)
