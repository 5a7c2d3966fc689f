"""One loader for everything sparsedoc evaluates, exports or generates with: base models,
training runs, checkpoints, adapters, exports.

``load_trained(path)`` loads what ``sparsedoc.artifacts.locate`` recognised:

* a **training run folder** (``config.yaml`` + ``checkpoints/step-*``): the latest complete
  checkpoint is applied to a fresh base model as ``adapter.method`` says: ``lora`` / ``prompt``
  with ``peft.PeftModel.from_pretrained``, ``lora_moe`` with
  ``sparsedoc.moe.inject.load_moe_adapter``, ``full`` by consolidating the DeepSpeed checkpoint
  (``zero_to_fp32``);
* a **checkpoint folder** (``<run>/checkpoints/step-N``): the same, for that step;
* an **adapter folder**: peft (``adapter_config.json`` with ``base_model_name_or_path``) or
  sparsedoc LoRA-MoE (``"format": "sparsedoc-lora-moe"``), applied to the base it names;
* a **plain HF folder** (``config.json``: a base model or an export), a hub id, or ``embedded``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from sparsedoc.artifacts import (ADAPTER_CONFIG, RUN_CONFIG, Artifact, ArtifactError, Loaded,
                                 deepspeed_files_problem, locate)
from sparsedoc.config import Config, ModelCfg
from sparsedoc.methods import UnknownMethod, method_class
from sparsedoc.models.load import load_model_and_tokenizer, resolve_dtype
from sparsedoc.safeload import check_torch_files, check_weight_files, weights_only_loads

log = logging.getLogger("sparsedoc")


def _fingerprint(paths: list[Path]) -> str:
    """Cheap identity of the weights (path, size, mtime), so cached predictions of a model that
    was retrained in place are not reused."""
    h = hashlib.sha256()
    for p in sorted(paths):
        for f in sorted(p.rglob("*") if p.is_dir() else [p]):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".json"):
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prompt_virtual_tokens(model) -> int:
    """Soft-prompt length of a peft prompt-learning model (its logits carry these positions
    first), else 0."""
    cfg = getattr(model, "active_peft_config", None)
    if cfg is not None and getattr(cfg, "is_prompt_learning", False):
        return int(cfg.num_virtual_tokens)
    return 0


def _apply_adapter(model, method: str, adapter_dir: Path):
    try:
        return method_class(method).load_adapter(model, adapter_dir)
    except UnknownMethod as e:
        raise ArtifactError(f"{adapter_dir}: {e}") from None


def _load_full(model, ckpt: Path) -> None:
    """Consolidate a ZeRO checkpoint (any stage) into fp32 weights and load them exactly."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    why = deepspeed_files_problem(ckpt)
    if why:
        raise ArtifactError(f"{ckpt}: cannot consolidate the full fine-tune, {why}")
    check_torch_files(ckpt)
    with weights_only_loads():
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(expected - set(state) - tied)
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise ArtifactError(f"{ckpt}: consolidated weights do not match the model; missing "
                            f"{missing[:5]}, unexpected {extra[:5]}")
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if tied:
        model.tie_weights()


def _load_checkpoint(art: Artifact, dtype: torch.dtype, trust_remote_code: bool):
    ckpt = art.checkpoint
    if art.config_file is None:
        raise ArtifactError(f"{ckpt}: a checkpoint with no {RUN_CONFIG}, here or in its run "
                            f"folder; cannot tell which base model and method made it")
    cfg: Config = art.config()
    method = cfg.adapter.method
    if cfg.model.trust_remote_code and not trust_remote_code:
        # The run's config was written by whoever trained it, not by the user loading it here.
        raise ArtifactError(f"{art.config_file}: sets model.trust_remote_code=true; loading "
                            f"this {art.kind} would run Python code from "
                            f"{cfg.model.name_or_path}, which sparsedoc never does on an "
                            f"artifact's say-so. Read that code first; then pass "
                            f"--trust-remote-code (evaluate: trust_remote_code=true)")
    check_torch_files(ckpt)
    model, tokenizer, base_path = load_model_and_tokenizer(cfg.model, dtype)
    adapter_dir = ckpt / "adapter"
    if method == "full":
        _load_full(model, ckpt)
        weights = [ckpt]
    else:
        if not adapter_dir.is_dir():
            raise ArtifactError(f"{adapter_dir}: missing; checkpoint of a {method} run "
                                f"without its adapter")
        check_weight_files(adapter_dir)
        model = _apply_adapter(model, method, adapter_dir)
        weights = [adapter_dir]
    run_dir = art.run_dir or ckpt.parents[1]
    loaded = dict(kind=art.kind, method=method, path=art.path, checkpoint=str(ckpt),
                  step=art.step, base_model=base_path, seed=cfg.train.seed,
                  run_dir=str(run_dir.resolve()), fingerprint=_fingerprint(weights),
                  adapter_dir=str(adapter_dir) if method != "full" else None, name=art.name)
    return model, tokenizer, loaded


def _load_adapter_folder(art: Artifact, dtype: torch.dtype, trust_remote_code: bool):
    meta = art.adapter
    if not meta.base_model:
        raise ArtifactError(f"{meta.dir / ADAPTER_CONFIG} names no base model")
    check_weight_files(meta.dir)
    model, tokenizer, base_path = load_model_and_tokenizer(
        ModelCfg(name_or_path=meta.base_model, trust_remote_code=trust_remote_code), dtype)
    model = _apply_adapter(model, meta.method, meta.dir)
    loaded = dict(kind="adapter", method=meta.method, path=art.path, base_model=base_path,
                  fingerprint=_fingerprint([meta.dir]), adapter_dir=str(meta.dir),
                  name=art.name)
    return model, tokenizer, loaded


def load_trained(path: str, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False):
    """Load any model sparsedoc can score, export or generate with; returns
    ``(model, tokenizer, Loaded)``, the model in eval mode on ``device`` (auto: cuda if
    available). ``Loaded`` says what was loaded (``sparsedoc.artifacts.Loaded``).

    ``trust_remote_code`` is the user's own opt-in (``--trust-remote-code``) to run Python that
    ships in a model folder; an artifact's saved config never turns it on by itself."""
    torch_dtype = resolve_dtype(dtype)
    art = locate(path)
    if art.kind in ("run", "checkpoint"):
        model, tokenizer, fields = _load_checkpoint(art, torch_dtype, trust_remote_code)
    elif art.kind == "adapter":
        model, tokenizer, fields = _load_adapter_folder(art, torch_dtype, trust_remote_code)
    else:
        if Path(art.path).is_dir():
            check_torch_files(art.path)
        model, tokenizer, base_path = load_model_and_tokenizer(
            ModelCfg(name_or_path=art.path, trust_remote_code=trust_remote_code), torch_dtype)
        method = "lora_moe" if model.config.model_type == "sparsedoc_lora_moe" else "base"
        fields = dict(kind="hf", method=method, path=base_path, base_model=base_path,
                      fingerprint=_fingerprint([Path(base_path)]) if Path(base_path).is_dir()
                      else base_path, name=Path(base_path).name)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model.to(dev)
    model.eval()
    loaded = Loaded(**fields, device=str(dev), dtype=str(torch_dtype).replace("torch.", ""))
    log.info("loaded %s (%s, %s) on %s", loaded.name, loaded.kind, loaded.method, dev)
    return model, tokenizer, loaded
