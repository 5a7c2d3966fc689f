"""LoRA-MoE inside a real (tiny) Llama: injection, training-step invariants, routing records,
queues, save/load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sparsedoc.artifacts import ArtifactError
from sparsedoc.config import Config, ConfigError, MoECfg, load_config
from sparsedoc.data.collate import PackCollator, PadCollator, pack_examples
from sparsedoc.data.dataset import prepare_data
from sparsedoc.models.load import enable_activation_checkpointing, load_tokenizer
from sparsedoc.moe.inject import (inject_lora_moe, load_moe_adapter, moe_layers, routing_layers)
from sparsedoc.moe.layer import LoRAMoELinear
from sparsedoc.methods.lora_moe import LoraMoEMethod, label_queue, queues_in_sync
from sparsedoc.moe.record import record_routing
from sparsedoc.data.batch import model_inputs


def load_tiny(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def moe_config(tiny_model_dir, toy_data, **moe) -> Config:
    train, evals = toy_data
    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{train}]",
                 f"data.eval_files=[{evals}]", "adapter.moe.dropout=0.0"]
    overrides += [f"adapter.moe.{k}={v}" for k, v in moe.items()]
    return load_config(None, overrides)


def a_batch(cfg, tiny_model_dir, n=4):
    tok = load_tokenizer(str(tiny_model_dir))
    data = prepare_data(cfg.data, tok, seed=0)
    return PadCollator(tok.pad_token_id, data.label_vocab)(data.train[:n])


def built(cfg, tiny_model_dir):
    method = LoraMoEMethod()
    model = method.build(load_tiny(tiny_model_dir), cfg)
    model.train()
    return method, model


def test_injection_targets_freezing_and_param_count(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    names = inject_lora_moe(model, MoECfg(num_experts=4, top_k=2, r=8,
                                          target_modules=["q_proj", "re:.*mlp\\.down_proj"]))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(k in n for k in ("lora_A", "lora_B", "router")) for n in trainable)
    # q_proj 64->64, down_proj 128->64: E*r*(in+out) + router E*in each, two blocks
    expect = 2 * (4 * 8 * (64 + 64) + 4 * 64 + 4 * 8 * (128 + 64) + 4 * 128)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expect


def test_no_target_match_names_the_model_linears(tiny_model_dir):
    with pytest.raises(ValueError, match="q_proj"):
        inject_lora_moe(load_tiny(tiny_model_dir), MoECfg(target_modules=["query"]))


def test_fresh_moe_model_equals_base_model(tiny_model_dir):
    base = load_tiny(tiny_model_dir)
    model = load_tiny(tiny_model_dir)
    inject_lora_moe(model, MoECfg())
    ids = torch.randint(0, 1000, (2, 9))
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("contrastive", ["label", "label_mi", "expert", "none"])
def test_step_changes_only_experts_and_routers(tiny_model_dir, toy_data, contrastive):
    cfg = moe_config(tiny_model_dir, toy_data, contrastive=contrastive, top_k=1)
    method, model = built(cfg, tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = a_batch(cfg, tiny_model_dir)
    for step in range(2):  # second step has a non-empty queue for the contrast
        loss, metrics = method.compute_loss(model, batch, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        method.after_optimizer_step(model, step + 1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all(("lora_" in n) or (".router." in n) for n in changed), changed
    assert any(".router." in n for n in changed), "top-1 router received no update"
    if contrastive != "none":
        assert metrics["moe/contrastive_anchors"] > 0
        assert metrics["moe/contrastive_loss"] > 0


def test_label_queue_fills_with_labelled_records(tiny_model_dir, toy_data):
    cfg = moe_config(tiny_model_dir, toy_data, contrastive="label", queue_size=6)
    method, model = built(cfg, tiny_model_dir)
    batch = a_batch(cfg, tiny_model_dir, n=4)
    queue = label_queue(model)
    L = len(routing_layers(model))
    assert queue.vectors.shape == (1, 6, L * 4)
    for step in range(2):
        method.compute_loss(model, batch, step)
        method.after_optimizer_step(model, step + 1)
    vecs, labels = queue.get(0)
    assert len(vecs) == 6  # 8 labelled records went in, the ring keeps the newest 6
    assert sorted(set(labels.tolist())) == sorted(set(batch["record_label_ids"].tolist()))
    # each layer's block is a record's mean of centred unit logit vectors scaled by 1/sqrt(L):
    # it sums to 0 and its norm is at most 1/sqrt(L) (equal only if all its tokens agree)
    blocks = vecs.view(6, L, 4)
    torch.testing.assert_close(blocks.sum(-1), torch.zeros(6, L), atol=1e-6, rtol=0)
    assert (blocks.norm(dim=-1) <= L ** -0.5 + 1e-6).all() and (blocks.norm(dim=-1) > 0).all()
    assert queues_in_sync(model)  # single process: trivially, but the collective runs


def test_label_mi_queue_holds_each_records_mean_routing_probabilities(tiny_model_dir, toy_data):
    cfg = moe_config(tiny_model_dir, toy_data, contrastive="label_mi", queue_size=6)
    method, model = built(cfg, tiny_model_dir)
    batch = a_batch(cfg, tiny_model_dir, n=4)
    L = len(routing_layers(model))
    with record_routing() as record:
        model(**model_inputs(batch))
    method.router_losses(record, batch)
    method.after_optimizer_step(model, 1)
    vecs, labels = label_queue(model).get(0)
    assert labels.tolist() == batch["record_label_ids"].tolist()
    # record 0's block for the first router: the mean of its tokens' sharpened probabilities
    logits = record.routing[method.router_names[0]].logits.detach().float()
    first = (logits / cfg.adapter.moe.temperature).softmax(-1).reshape(-1, 4)
    own = (batch["record_ids"].reshape(-1) == 0)
    torch.testing.assert_close(vecs[0, :4], first[own].mean(0))
    torch.testing.assert_close(vecs.view(-1, L, 4).sum(-1), torch.ones(len(vecs), L))


def _router_grads(method, model, batch):
    """Router weight gradients of the contrastive term alone."""
    model.zero_grad()
    with record_routing(sample_rows=method._sample_tokens(batch, 0)
                        if method.cfg.contrastive == "expert" else None) as record:
        model(**model_inputs(batch))
    aux = method.router_losses(record, batch)
    if aux["contrastive"].requires_grad:
        aux["contrastive"].backward()
    return [layer.router.weight.grad for _, layer in routing_layers(model)]


@pytest.mark.parametrize("mode", ["linear", "ffn"])
@pytest.mark.parametrize("contrastive", ["label", "label_mi", "expert", "none"])
def test_each_contrast_alone_reaches_the_router(tiny_model_dir, toy_data, contrastive, mode):
    cfg = moe_config(tiny_model_dir, toy_data, contrastive=contrastive, mode=mode)
    method, model = built(cfg, tiny_model_dir)
    with torch.no_grad():  # trained-looking experts: B = 0 makes every expert output zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    grads = _router_grads(method, model, a_batch(cfg, tiny_model_dir, n=8))
    if contrastive == "none":
        assert all(g is None or g.abs().sum() == 0 for g in grads)
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in grads), contrastive


@pytest.mark.parametrize("contrastive", ["label", "label_mi"])
def test_packed_and_unpacked_records_give_the_same_label_contrast(tiny_model_dir, toy_data,
                                                                  contrastive):
    """Each record in a packed row keeps its own label and its own tokens' routing."""
    cfg = moe_config(tiny_model_dir, toy_data, contrastive=contrastive)
    method, model = built(cfg, tiny_model_dir)
    model.eval()  # no dropout: both batches see identical hidden states
    tok = load_tokenizer(str(tiny_model_dir))
    data = prepare_data(cfg.data, tok, seed=0)
    rows = data.train[:6]
    assert len({r.label for r in rows}) == 2
    unpacked = PadCollator(tok.pad_token_id, data.label_vocab)(rows)
    packed_rows = pack_examples(rows, max_seq_len=sum(len(r.input_ids) for r in rows[:3]))
    assert len(packed_rows) == 2
    packed = PackCollator(tok.pad_token_id, data.label_vocab)(packed_rows)
    assert packed["record_label_ids"].tolist() == unpacked["record_label_ids"].tolist()

    def label_loss(batch):
        with record_routing() as record:
            model(**model_inputs(batch))
        return method.router_losses(record, batch)["contrastive"]

    torch.testing.assert_close(label_loss(packed), label_loss(unpacked), rtol=1e-4, atol=1e-5)


def _state_tensors(model):
    """Every tensor a module holds outside its parameters: plain attributes and buffers."""
    out = {}
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            if torch.is_tensor(v) or hasattr(v, "probs"):  # a tensor or a RouterOutput
                out[f"{name}.{k}"] = v
        for k, b in m.named_buffers(recurse=False):
            out[f"{name}.{k}"] = b.clone()
    return out


@pytest.mark.parametrize("moe", [dict(mode="linear"), dict(mode="linear", router_scope="block"),
                                 dict(mode="ffn")])
def test_no_routing_state_is_left_on_modules(tiny_model_dir, toy_data, moe):
    cfg = moe_config(tiny_model_dir, toy_data, contrastive="expert", **moe)
    method, model = built(cfg, tiny_model_dir)
    batch = a_batch(cfg, tiny_model_dir)
    before = _state_tensors(model)
    loss, _ = method.compute_loss(model, batch, 0)
    loss.backward()
    after = _state_tensors(model)
    assert before.keys() == after.keys(), set(after) ^ set(before)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(getattr(m, "handoff", None) is None for m in model.modules())


@pytest.mark.parametrize("contrastive,mode", [("label", "linear"), ("expert", "linear"),
                                              ("expert", "ffn")])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tiny_model_dir, toy_data,
                                                                   contrastive, mode):
    # top-2: the expert contrast reaches the router through the gates of the routed output
    cfg = moe_config(tiny_model_dir, toy_data, contrastive=contrastive, top_k=2, mode=mode)
    batch = a_batch(cfg, tiny_model_dir)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        method, model = built(cfg, tiny_model_dir)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
        if ckpt:
            enable_activation_checkpointing(model)
            assert model.is_gradient_checkpointing
        recorded = []
        real = method.router_losses

        def counting(record, b, *rest):
            recorded.append((len(record.routing), len(record.expert_outputs)))
            return real(record, b, *rest)

        method.router_losses = counting
        loss, metrics = method.compute_loss(model, batch, 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss), metrics, grads, recorded))
    (l0, m0, g0, r0), (l1, m1, g1, r1) = results
    assert r0 == r1  # each layer recorded once, with or without recompute
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert float(m0["moe/contrastive_loss"]) == pytest.approx(float(m1["moe/contrastive_loss"]),
                                                              rel=1e-6)
    assert m0["moe/contrastive_loss"] > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-7, msg=n)


def test_router_gradient_with_gradient_checkpointing(tiny_model_dir, toy_data):
    cfg = moe_config(tiny_model_dir, toy_data, top_k=1)
    method, model = built(cfg, tiny_model_dir)
    enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing
    loss, _ = method.compute_loss(model, a_batch(cfg, tiny_model_dir), 0)
    loss.backward()
    for name, layer in routing_layers(model):
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0, name


def test_block_router_is_shared_and_decided_once(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    inject_lora_moe(model, MoECfg(router_scope="block", num_experts=4, top_k=2))
    leaders = routing_layers(model)
    assert [n for n, _ in leaders] == ["model.layers.0.self_attn.q_proj",
                                       "model.layers.1.self_attn.q_proj"]
    routers = [n for n, _ in model.named_parameters() if "router" in n]
    assert len(routers) == 2
    with record_routing() as record:
        model(input_ids=torch.randint(0, 1000, (2, 5)))
    assert sorted(record.routing) == sorted(n for n, _ in leaders)  # one decision per block


def test_adapter_save_load_round_trip_gives_equal_logits(tiny_model_dir, toy_data, tmp_path):
    cfg = moe_config(tiny_model_dir, toy_data, shared_expert=True)
    method, model = built(cfg, tiny_model_dir)
    with torch.no_grad():
        for _, layer in moe_layers(model):
            layer.lora_B.normal_(std=0.05)
            layer.shared_B.normal_(std=0.05)
    model.eval()
    method.write_adapter(model, tmp_path / "adapter")
    fresh = load_tiny(tiny_model_dir)
    load_moe_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    ids = torch.randint(0, 1000, (2, 11))
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits,
                               rtol=0, atol=1e-6)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and not any("queue" in k for k in saved)  # queues are training state only


def test_adapter_load_rejects_corrupt_or_mismatched(tiny_model_dir, toy_data, tmp_path):
    cfg = moe_config(tiny_model_dir, toy_data)
    method, model = built(cfg, tiny_model_dir)
    method.write_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="cannot read safetensors"):
        load_moe_adapter(load_tiny(tiny_model_dir), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_moe_adapter(load_tiny(tiny_model_dir), tmp_path / "missing")


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_experts_without_tokens_still_get_a_gradient(dispatch):
    """Stacked experts: an expert that received no token has zero (not missing) gradient rows,
    so it takes part in the data-parallel gradient reduction like every other parameter."""
    from torch import nn

    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(8, 8), 4, 1, 2, alpha=4, dispatch=dispatch)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0  # every token with x[0] > 0 goes to expert 2
        layer.lora_B.normal_()
    layer.record_name = "layer"
    x = torch.randn(6, 8).abs()
    with record_routing() as record:
        layer(x).sum().backward()
    used = set(record.routing["layer"].top_idx.reshape(-1).tolist())
    assert used == {2}
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    for e in range(4):
        assert (layer.lora_B.grad[e].abs().sum() > 0) == (e in used)


def test_queue_sync_check_detects_a_diverged_rank(tiny_model_dir, toy_data, monkeypatch):
    import sparsedoc.methods.lora_moe as moe_method

    cfg = moe_config(tiny_model_dir, toy_data, contrastive="label")
    _, model = built(cfg, tiny_model_dir)
    label_queue(model).enqueue(0, torch.randn(3, label_queue(model).dim), torch.tensor([0, 1, 0]))
    assert queues_in_sync(model)
    # a second "rank" whose queue digest differs by one write
    monkeypatch.setattr(moe_method, "all_gather_cat", lambda t: torch.cat([t, t + 1.0]))
    assert not queues_in_sync(model)


_ROUTER_LR_SCRIPT = r"""
import json, sys, torch, deepspeed
from transformers import AutoModelForCausalLM
from sparsedoc.config import load_config
from sparsedoc.methods.lora_moe import LoraMoEMethod
from sparsedoc.resources import ds_config_path
from sparsedoc.distributed import build_ds_config, init_distributed
tiny, scale = sys.argv[1], float(sys.argv[2])
cfg = load_config(None, [f"model.name_or_path={tiny}", f"adapter.moe.router_lr_scale={scale}",
                         "train.lr=0.01", "train.warmup_steps=2", "train.max_steps=6"])
init_distributed()
method = LoraMoEMethod()
model = method.build(AutoModelForCausalLM.from_pretrained(tiny), cfg)
ds = build_ds_config(ds_config_path("zero2"), cfg, 1, torch.float32)
groups = method.param_groups(model, cfg.train.lr)
router_ids = {id(p) for r in method.routers for p in r.parameters()}
sizes = [len(g["params"]) for g in groups]  # read before ZeRO swaps in its flat partitions
router_group = sorted({i for i, g in enumerate(groups) for p in g["params"] if id(p) in router_ids})
engine, opt, _, sched = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
rows = []
for _ in range(5):
    sched.step()
    rows.append([g["lr"] for g in opt.param_groups])
print(json.dumps({"lrs": rows, "groups": sizes, "router_params": len(router_ids),
                  "router_group": router_group}))
"""


@pytest.mark.slow  # real DeepSpeed engine and scheduler, in a child process
def test_router_lr_scale_survives_deepspeeds_optimizer_and_schedule(tiny_model_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from sparsedoc.distributed import free_port

    script = tmp_path / "lr.py"
    script.write_text(_ROUTER_LR_SCRIPT)
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), "10"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["router_group"] == [1] and out["groups"][1] == out["router_params"] > 0
    lrs = out["lrs"]
    assert len({round(row[0], 12) for row in lrs}) > 1  # the schedule moves the lr
    for base, router in lrs:  # ... and keeps the router's at 10x at every step
        assert router == pytest.approx(10 * base, rel=1e-9)
    with pytest.raises(ConfigError, match="router_lr_scale=10.0 needs train.lr_schedule=cosine"):
        load_config(None, ["adapter.moe.router_lr_scale=10", "train.lr_schedule=linear"])
