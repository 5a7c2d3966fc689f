"""Exports, checked against models the tests build themselves: the trained-model logits are
computed here independently, the exported folder is reloaded the way a user would (stock
transformers in a process where sparsedoc cannot even be imported, where the mode allows)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsedoc.config import MoECfg

REPO = Path(__file__).resolve().parents[1]
IDS = [[1, 5, 17, 300, 2000, 42, 7, 99, 1000, 3], [10, 20, 30, 40]]


def _randomise(model, seed=0):
    """Non-zero LoRA B and a calibrated-looking router direction, so a lost adapter shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "shared_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for n, b in model.named_buffers():
            if n.endswith("shared_direction"):
                b.copy_(torch.nn.functional.normalize(torch.randn(b.shape, generator=g), dim=0))


def _logits(model, ids_list=IDS):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in ids_list]


def _moe_adapter(tmp_path, tiny_model_dir, cfg: MoECfg, name="adapter"):
    from transformers import AutoModelForCausalLM

    from sparsedoc.moe.inject import inject_lora_moe, save_moe_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inject_lora_moe(model, cfg)
    _randomise(model)
    model.eval()
    save_moe_adapter(model, tmp_path / name, cfg, str(tiny_model_dir), "dense")
    return model, tmp_path / name


def _stock_logits(folder: Path, ids=IDS, expect_class: str = "") -> list[torch.Tensor]:
    """Logits from a separate Python in which ``import sparsedoc`` fails: plain transformers."""
    code = f"""
import sys, json, torch
sys.modules["sparsedoc"] = None  # prove no sparsedoc code is needed
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32).eval()
out = {{"cls": type(m).__name__, "logits": []}}
with torch.no_grad():
    for ids in {ids!r}:
        out["logits"].append(m(input_ids=torch.tensor([ids])).logits[0].tolist())
print("RESULT" + json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    if expect_class:
        assert out["cls"] == expect_class
    return [torch.tensor(x) for x in out["logits"]]


def _export(src, out, **kw):
    from sparsedoc.export import ExportOptions, export

    return export(src, out, ExportOptions(**kw))


def test_lora_export_loads_in_plain_transformers_with_equal_logits(tiny_model_dir, toy_data,
                                                                    tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"]))
    _randomise(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "lora")
    reference = _logits(peft_model)
    base_only = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                             dtype=torch.float32))

    meta = _export(tmp_path / "lora", tmp_path / "out", data=[str(toy_data[1])],
                   max_shard_size="4MB")
    assert meta["mode"] == "merged" and meta["verification"]["passed"]
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json",
            "generation_config.json", "README.md", "export_metadata.json"} <= files
    assert len([f for f in files if f.startswith("model-") and f.endswith(".safetensors")]) > 1
    assert "chat_template" in (tmp_path / "out" / "tokenizer_config.json").read_text() or \
        (tmp_path / "out" / "chat_template.jinja").is_file()
    got = _stock_logits(tmp_path / "out", expect_class="LlamaForCausalLM")
    for a, b, c in zip(reference, got, base_only):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        assert (a - c).abs().max() > 1e-3  # the LoRA changed the model: a lost LoRA would show
    # the metadata reports what this test measures
    assert meta["verification"]["reloaded"]["max_abs_logit_diff"] < 1e-3


def test_lora_export_in_bf16_is_bitwise_the_rounded_merge(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32), LoraConfig(r=4, target_modules=["q_proj"]))
    _randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "lora")
    meta = _export(tmp_path / "lora", tmp_path / "out", dtype="bf16")
    assert meta["verification"]["weights"]["weights_equal"]
    w = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.bfloat16
    merged = peft_model.merge_and_unload().model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, merged.detach().to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_routed_moe_export_reloads_with_equal_logits_and_greedy_generation(tiny_model_dir,
                                                                          toy_data, tmp_path):
    import sparsedoc

    cfg = MoECfg(num_experts=4, top_k=2, r=4, shared_expert=True)
    trained, adapter = _moe_adapter(tmp_path, tiny_model_dir, cfg)
    meta = _export(adapter, tmp_path / "out", data=[str(toy_data[1])])
    assert meta["mode"] == "routed"

    reloaded = sparsedoc.load_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "SparsedocMoEForCausalLM"
    for a, b in zip(_logits(trained), _logits(reloaded)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    x = torch.tensor([IDS[0]])
    gen = {name: m.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                            max_new_tokens=12, pad_token_id=0)
           for name, m in (("trained", trained), ("exported", reloaded))}
    assert torch.equal(gen["trained"], gen["exported"])
    # the shared expert was merged into the dense weights; routed experts and routers stay
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "sparsedoc_lora_moe"
    assert config["sparsedoc_moe"]["shared_expert"] is False
    assert not any("shared_A" in n for n, _ in reloaded.named_parameters())


def test_routed_export_without_sparsedoc_fails_loudly(tiny_model_dir, tmp_path):
    _, adapter = _moe_adapter(tmp_path, tiny_model_dir, MoECfg(num_experts=2, top_k=1, r=2))
    _export(adapter, tmp_path / "out")
    code = (f"import sys; sys.modules['sparsedoc'] = None\n"
            f"from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0  # never a silent base model without the experts
    assert "sparsedoc_lora_moe" in proc.stderr


def test_ffn_moe_exports_as_stock_mixtral_with_equal_logits(tiny_model_dir, toy_data, tmp_path):
    cfg = MoECfg(mode="ffn", num_experts=4, top_k=2, r=4)
    trained, adapter = _moe_adapter(tmp_path, tiny_model_dir, cfg)
    meta = _export(adapter, tmp_path / "out", data=[str(toy_data[1])])
    assert meta["mode"] == "mixtral"
    got = _stock_logits(tmp_path / "out", expect_class="MixtralForCausalLM")
    for a, b in zip(_logits(trained), got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert config["num_experts_per_tok"] == 2
    # servers and older transformers read rope_theta, not rope_parameters
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys  # vLLM's layout
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys


def test_mixtral_export_refuses_a_per_linear_moe(tiny_model_dir, tmp_path):
    from sparsedoc.export import ExportError

    _, adapter = _moe_adapter(tmp_path, tiny_model_dir, MoECfg(num_experts=2, top_k=2, r=2))
    with pytest.raises(ExportError, match="mode=ffn"):
        _export(adapter, tmp_path / "out", mode="mixtral")
    assert not (tmp_path / "out").exists()


def _safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the (possibly sharded) safetensors files in ``folder``."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _expected_gates(x: torch.Tensor, w_router: torch.Tensor, u: torch.Tensor, top_k: int
                    ) -> torch.Tensor:
    """(T, E) gates as docs/method.md and the router's docstring define them, in float64:
    logits of the input with its component along the calibrated unit direction u removed,
    (I - u u^T) x, scored by W_r; softmax; the top k kept and renormalised over themselves
    (top-1 keeps its raw probability); zero for the experts not chosen."""
    x_perp = x - torch.outer(x @ u, u)
    probs = torch.softmax(x_perp @ w_router.t(), dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    if top_k > 1:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(1, top_i, top_p)


def _dense_reference(trained, tiny_model_dir: Path, adapter: Path, calib_file: Path,
                     tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    """The documented dense weights of every routed linear, ``W + sum_e g_e s B_e A_e`` with
    ``g_e`` the mean gate over every real token of the calibration records, rebuilt here from
    the base model's and the adapter's files (not from the exporter's code), with the gates
    recomputed from the router weights and the inputs each linear sees in the routed model
    (captured with forward hooks, one record at a time: no padding involved). Alongside, the
    weights an exporter that ignored the gates would write: uniform 1/E and all-ones."""
    from sparsedoc.data.dataset import load_records
    from sparsedoc.data.tokenize import tokenize_records

    meta = json.loads((adapter / "adapter_config.json").read_text())
    moe = meta["moe"]
    E, k, s = moe["num_experts"], moe["top_k"], moe["alpha"] / moe["r"]
    ad = {n: t.double() for n, t in _safetensors_dir(adapter).items()}
    base = {n: t.double() for n, t in _safetensors_dir(tiny_model_dir).items()}
    names = [n for n in meta["modules"] if f"{n}.lora_A" in ad]
    assert len(names) == 14  # 7 projections x 2 layers: every one is checked

    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [trained.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: inputs[n].append(args[0].reshape(-1, args[0].shape[-1])))
        for n in names]
    rows, _ = tokenize_records(load_records([str(calib_file)]), tokenizer, max_seq_len=512)
    try:
        with torch.no_grad():
            for r in rows:
                trained(input_ids=torch.tensor([r.input_ids]))
    finally:
        for h in hooks:
            h.remove()
    n_tokens = sum(len(r.input_ids) for r in rows)

    out = {}
    for n in names:
        x = torch.cat(inputs[n]).double()
        assert x.shape[0] == n_tokens
        g = _expected_gates(x, ad[f"{n}.router.weight"], ad[f"{n}.router.shared_direction"],
                            k).mean(0)
        deltas = [s * ad[f"{n}.lora_B"][e] @ ad[f"{n}.lora_A"][e] for e in range(E)]
        w0 = base[f"{n}.weight"]
        if f"{n}.shared_A" in ad:  # the always-on expert is merged whole
            w0 = w0 + s * ad[f"{n}.shared_B"] @ ad[f"{n}.shared_A"]
        out[n] = {"expected": w0 + sum(g[e] * deltas[e] for e in range(E)),
                  "uniform": w0 + sum(deltas) / E, "all_ones": w0 + sum(deltas),
                  "gates": g}
    return out


def test_dense_export_reports_the_real_gap(tiny_model_dir, toy_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsedoc.data.collate import PadCollator
    from sparsedoc.data.dataset import eval_batches, load_records
    from sparsedoc.data.tokenize import tokenize_records
    from sparsedoc.models.load import load_tokenizer

    cfg = MoECfg(num_experts=4, top_k=2, r=4, shared_expert=True)
    trained, adapter = _moe_adapter(tmp_path, tiny_model_dir, cfg)
    meta = _export(adapter, tmp_path / "out", mode="dense", data=[str(toy_data[1])])
    gap = meta["dense_gap"]
    assert meta["approximate"] is True
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(dense).__name__ == "LlamaForCausalLM"
    # recompute the gap on the same held-out records, independently of the exporter's code
    tok = load_tokenizer(str(tiny_model_dir))
    rows, _ = tokenize_records(load_records([str(toy_data[1])])[:64], tok, max_seq_len=512)
    max_d, sum_d, n, nll, n_t = 0.0, 0.0, 0, {"r": 0.0, "d": 0.0}, 0
    with torch.no_grad():
        for b in eval_batches(rows, PadCollator(tok.pad_token_id, {}), 8, 0, 1):
            m = b["attention_mask"].bool()
            lr = trained(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            ld = dense(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            d = (lr - ld).abs()[m]
            max_d, sum_d, n = max(max_d, float(d.max())), sum_d + float(d.sum()), n + d.numel()
            lab = b["labels"][:, 1:]
            keep = lab != -100
            for k, lg in (("r", lr), ("d", ld)):
                nll[k] += float(torch.nn.functional.cross_entropy(
                    lg[:, :-1][keep], lab[keep], reduction="sum"))
            n_t += int(keep.sum())
    assert gap["max_abs_logit_diff"] == pytest.approx(max_d, rel=1e-4)
    assert gap["mean_abs_logit_diff"] == pytest.approx(sum_d / n, rel=1e-4)
    assert gap["ppl_routed"] == pytest.approx(float(torch.tensor(nll["r"] / n_t).exp()), rel=1e-4)
    assert gap["ppl_dense"] == pytest.approx(float(torch.tensor(nll["d"] / n_t).exp()), rel=1e-4)
    assert gap["max_abs_logit_diff"] > 0  # it is an approximation, and says so
    assert gap["mcq_items"] > 0 and gap["mcq_acc_dense"] is not None
    assert "APPROXIMATE" in (tmp_path / "out" / "README.md").read_text().upper()
    # only --data given: the gates were measured on the held-out records, and that is flagged
    assert "optimistic" in gap["calibration_source"] and gap["calibration_records"] == 16
    meta2 = _export(adapter, tmp_path / "out2", mode="dense", data=[str(toy_data[1])],
                    calib_data=[str(toy_data[0])])
    assert meta2["dense_gap"]["calibration_source"] == "--calib-data"
    assert meta2["dense_gap"]["calibration_records"] == 48  # the toy train set, all of it

    # The weights are the documented merge: W + sum_e mean_gate_e * s B_e A_e, gates recomputed
    # here (tests/test_export.py::_dense_reference), compared with what the file holds.
    ref = _dense_reference(trained, tiny_model_dir, adapter, toy_data[0], tok)
    written = _safetensors_dir(tmp_path / "out2")
    base = _safetensors_dir(tiny_model_dir)
    assert set(written) == set(base)  # a plain Llama of the base architecture, nothing else
    for name in set(base) - {f"{n}.weight" for n in ref}:
        assert torch.equal(written[name], base[name]), name  # untouched: norms, embeddings
    tol = 1e-5
    miss = {kind: max(float((written[f"{n}.weight"].double() - r[kind]).abs().max())
                      for n, r in ref.items()) for kind in ("expected", "uniform", "all_ones")}
    assert miss["expected"] < tol, miss
    # negative control: exports that ignore the gates are far outside that tolerance, so this
    # test fails them (the gates measured here are far from uniform, and sum to 1 per token)
    assert miss["uniform"] > 100 * tol and miss["all_ones"] > 100 * tol, miss
    for r in ref.values():
        assert float(r["gates"].sum()) == pytest.approx(1.0)  # top-k renormalised gates


# ---- guards ----------------------------------------------------------------------------------------
def _no_debris(parent: Path, name: str) -> None:
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], \
        list(parent.iterdir())


def test_refuses_a_non_empty_target_without_force(tiny_model_dir, tmp_path):
    from sparsedoc.export import ExportError

    _, adapter = _moe_adapter(tmp_path, tiny_model_dir, MoECfg(num_experts=2, top_k=1, r=2))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass --force"):
        _export(adapter, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _export(adapter, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    _no_debris(tmp_path, "out")


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    from sparsedoc.cli import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("adapter:\n  method: lora\n")
    assert main(["export", str(run), str(tmp_path / "out")]) == 2  # bad input, not a failed check
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and str(run) in err
    assert not (tmp_path / "out").exists()
    _no_debris(tmp_path, "out")


def test_corrupt_safetensors_is_a_clear_error_and_leaves_nothing(tiny_model_dir, tmp_path):
    from sparsedoc.export import ExportError

    _, adapter = _moe_adapter(tmp_path, tiny_model_dir, MoECfg(num_experts=2, top_k=1, r=2))
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ExportError, match="adapter_model.safetensors"):
        _export(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _no_debris(tmp_path, "out")


def test_failed_verification_exits_non_zero_and_writes_nothing(tiny_model_dir, tmp_path,
                                                               monkeypatch, capsys):
    import sparsedoc.export as ex
    from sparsedoc.cli import main

    _, adapter = _moe_adapter(tmp_path, tiny_model_dir, MoECfg(num_experts=2, top_k=1, r=2))
    real = ex.build_routed

    def broken(model, cfg):  # an exporter bug: one expert's B lost on the way
        built = real(model, cfg)
        with torch.no_grad():
            built.model.layers[0].self_attn.q_proj.lora_B.zero_()
        return built

    monkeypatch.setattr(ex, "build_routed", broken)
    assert main(["export", str(adapter), str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "verification failed" in captured.err and "verified" not in captured.out
    assert not (tmp_path / "out").exists()
    _no_debris(tmp_path, "out")


def test_cli_export_prints_the_verification(tiny_model_dir, toy_data, tmp_path, capsys):
    from sparsedoc.cli import main

    _, adapter = _moe_adapter(tmp_path, tiny_model_dir, MoECfg(num_experts=2, top_k=2, r=2))
    assert main(["export", str(adapter), str(tmp_path / "out"), "--data", str(toy_data[1])]) == 0
    out = capsys.readouterr().out
    assert "max |logit diff|" in out and "export verified and written to" in out
    meta = json.loads((tmp_path / "out" / "export_metadata.json").read_text())
    assert meta["verification"]["passed"] and meta["size_bytes"] > 0


def test_evaluate_and_generate_load_a_routed_export(tiny_model_dir, tmp_path):
    from sparsedoc.loader import load_trained

    trained, adapter = _moe_adapter(tmp_path, tiny_model_dir, MoECfg(num_experts=2, top_k=2, r=2))
    _export(adapter, tmp_path / "out")
    model, _, info = load_trained(str(tmp_path / "out"), dtype="fp32", device="cpu")
    assert info.method == "lora_moe" and type(model).__name__ == "SparsedocMoEForCausalLM"
    for a, b in zip(_logits(trained), _logits(model)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_export_files_follow_the_umask(tiny_model_dir, tmp_path):
    import os

    _, adapter = _moe_adapter(tmp_path, tiny_model_dir, MoECfg(num_experts=2, top_k=1, r=2))
    old = os.umask(0o022)
    try:
        _export(adapter, tmp_path / "out")
    finally:
        os.umask(old)
    for f in (tmp_path / "out").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f  # others can read what is meant to be shared


def test_mode_choice_per_method():
    from sparsedoc.export import ExportError, resolve_mode

    assert resolve_mode("auto", "lora", None) == "merged"
    assert resolve_mode("auto", "full", None) == "merged"
    assert resolve_mode("auto", "lora_moe", MoECfg()) == "routed"
    assert resolve_mode("auto", "lora_moe", MoECfg(mode="ffn")) == "mixtral"
    with pytest.raises(ExportError, match="soft prompt"):
        resolve_mode("auto", "prompt", None)
    with pytest.raises(ExportError, match="does not apply to a lora model"):
        resolve_mode("dense", "lora", None)
