"""Sensitivity-LoRA (arXiv 2509.09119): a peft LoRA whose rank differs per target matrix,
allocated before training from the loss's second-order sensitivity (``methods.sensitivity``).

The LoRA's shape settings are ``adapter.lora``'s (r is the uniform rank whose trainable
parameters are the default budget); the allocation's are ``adapter.sensitivity``'s. The rank
map goes into peft's ``rank_pattern`` / ``alpha_pattern``, so the adapter folder is a plain
peft one (``PeftModel.from_pretrained`` rebuilds every shape from ``adapter_config.json``), and
export, evaluation and resume are LoRA's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from peft import LoraConfig, get_peft_model
from torch import nn

from sparsedoc.config import Config
from sparsedoc.methods.lora import LoraMethod, lora_targets
from sparsedoc.methods.peft_adapter import peft_task_type
from sparsedoc.methods.sensitivity import (RANK_MAP_FILE, RANK_PLOT_FILE, RankMap,
                                           estimate_rank_map, plot_rank_map)

log = logging.getLogger("sparsedoc")


class SensitivityLoraMethod(LoraMethod):
    name = "sensitivity_lora"
    title = "Sensitivity-LoRA"
    summary = ("Sensitivity-LoRA: one low-rank adapter on the frozen base (peft), its rank per "
               "matrix allocated from the empirical-Fisher sensitivity under LoRA's parameter "
               "budget")
    tag = "sensitivity-lora"
    config_section = "lora"
    default_config = "sensitivity_lora_demo"
    sweep_params = {"rank": "adapter.lora.r", "local_weight": "adapter.sensitivity.local_weight"}

    def __init__(self) -> None:
        self.rank_map: RankMap | None = None
        self.cfg: Config | None = None

    def configure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.plan_batches = cfg.adapter.sensitivity.calibration_batches

    def plan(self, model: nn.Module, batches: list[dict]) -> None:
        lora, s = self.cfg.adapter.lora, self.cfg.adapter.sensitivity
        self.rank_map = estimate_rank_map(
            model, lora_targets(model, lora.target_modules), batches, uniform_rank=lora.r, budget=s.budget,
            min_rank=s.min_rank, max_rank=s.max_rank, local_weight=s.local_weight,
            labels=s.labels, seed=self.cfg.train.seed)
        facts = self.rank_map.summary()
        log.info("Sensitivity-LoRA: %d matrices, ranks %d..%d (median %d), %s of %s budget "
                 "params, estimated on %d rows in %.2f s", facts["matrices"], facts["min"],
                 facts["max"], facts["median"], f"{facts['params']:,}", f"{facts['budget']:,}",
                 self.rank_map.settings["rows"], self.rank_map.calibration_seconds)

    def restore_plan(self, ckpt_dir: Path) -> None:
        self.rank_map = RankMap.load(Path(ckpt_dir) / RANK_MAP_FILE)

    def build(self, model: nn.Module, cfg: Config) -> nn.Module:
        if self.rank_map is None:
            raise RuntimeError("Sensitivity-LoRA builds from its rank map: call plan (or "
                               "restore_plan) before build")
        c = cfg.adapter.lora
        peft_cfg = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                              target_modules=lora_targets(model, c.target_modules),
                              task_type=peft_task_type(model), bias="none",
                              rank_pattern=dict(self.rank_map.ranks),
                              alpha_pattern=self.rank_map.alphas(
                                  c.alpha, cfg.adapter.sensitivity.alpha_mode))
        return get_peft_model(model, peft_cfg)

    # ---- files --------------------------------------------------------------------------------
    def _write_map(self, folder: Path) -> dict[str, str]:
        self.rank_map.save(folder / RANK_MAP_FILE)
        plot_rank_map(self.rank_map, folder / RANK_PLOT_FILE)
        return {"sensitivity/rank_map": RANK_PLOT_FILE}

    def write_run_files(self, run_dir: Path) -> dict[str, str]:
        return self._write_map(run_dir)

    def on_checkpoint(self, model: nn.Module, ckpt_dir: Path, step: int) -> dict[str, str]:
        self.rank_map.save(ckpt_dir / RANK_MAP_FILE)  # what a resume restores
        return {}

    def run_facts(self) -> dict:
        return {"rank_map": self.rank_map.summary(),
                "sensitivity_seconds": self.rank_map.calibration_seconds}

    @classmethod
    def card_lines(cls, lineage: dict) -> list[str]:
        return rank_map_card_lines(lineage)


def rank_map_card_lines(lineage: dict) -> list[str]:
    """The model card's rank-map section: the ranks chosen, per projection and overall."""
    rank_map = None
    for folder in (lineage.get("checkpoint"), lineage.get("run_dir")):
        if folder and (Path(folder) / RANK_MAP_FILE).is_file():
            try:
                rank_map = RankMap.load(Path(folder) / RANK_MAP_FILE)
            except (TypeError, ValueError):
                rank_map = None
            break
    lines = ["## Rank map (Sensitivity-LoRA)", ""]
    if rank_map is None:
        return lines + ["Rank map: not recorded.", ""]
    f = rank_map.summary()
    lines += [f"Ranks allocated per matrix from the empirical-Fisher sensitivity "
              f"({rank_map.settings.get('rows', '?')} calibration rows, labels "
              f"{rank_map.settings.get('labels', '?')}, local weight "
              f"{rank_map.settings.get('local_weight', '?')}): {f['matrices']} matrices, rank "
              f"{f['min']} to {f['max']} (median {f['median']}), bounds [{rank_map.min_rank}, "
              f"{rank_map.max_rank}]; {f['params']:,} adapter parameters of a {f['budget']:,} "
              f"budget (uniform rank {f['uniform_rank']}). Estimate: "
              f"{rank_map.calibration_seconds:.1f} s.", "",
              "| projection | mean rank |", "|---|---:|"]
    lines += [f"| {p} | {r:g} |" for p, r in f["mean_rank_by_projection"].items()]
    return lines + ["", f"The full map is `{RANK_MAP_FILE}` in the run folder and in each "
                        f"checkpoint.", ""]
