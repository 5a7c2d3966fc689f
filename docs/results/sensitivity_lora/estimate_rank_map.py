"""Sensitivity-LoRA's rank map on the embedded SmolLM2-135M-Instruct (demo config's settings,
calibration shrunk to fit a shared 2-core CPU), with its timing."""
import json, sys, time
from pathlib import Path
import torch
from sparsedoc.config import load_config
from sparsedoc.data.dataset import calibration_batches, make_collator, prepare_data
from sparsedoc.methods import new_method
from sparsedoc.models.load import load_model_and_tokenizer, resolve_dtype
n_batches, mbs, seq = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out = Path(sys.argv[4]); out.mkdir(parents=True, exist_ok=True)
cfg = load_config("sparsedoc/recipes/configs/sensitivity_lora_demo.yaml",
                  [f"adapter.sensitivity.calibration_batches={n_batches}", f"train.micro_batch_size={mbs}",
                   f"data.max_seq_len={seq}"])
t0 = time.perf_counter()
model, tok, _ = load_model_and_tokenizer(cfg.model, resolve_dtype("fp32"))
data = prepare_data(cfg.data, tok, 0, progress=False)
collate = make_collator(cfg.data, tok, data.label_vocab)
batches = calibration_batches(data.train, collate, n_batches, mbs, 0, 1, 0)
t1 = time.perf_counter()
m = new_method("sensitivity_lora"); m.configure(cfg); m.plan(model, batches)
t2 = time.perf_counter()
m.write_run_files(out)
peft = m.build(model, cfg)
trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
facts = {"model": "SmolLM2-135M-Instruct (embedded)", "calibration_batches": n_batches, "micro_batch_size": mbs,
         "max_seq_len": seq, "rows": m.rank_map.settings["rows"],
         "estimate_seconds": round(t2 - t1, 2), "fisher_seconds": m.rank_map.settings["fisher_seconds"],
         "svd_seconds": m.rank_map.settings["svd_seconds"], "load_and_data_seconds": round(t1 - t0, 2),
         "torch_threads": torch.get_num_threads(), "trainable_params": trainable,
         "summary": m.rank_map.summary()}
(out / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
print(json.dumps(facts, indent=2))
