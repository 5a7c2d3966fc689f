"""The training loop every recipe shares: DeepSpeed step, periodic eval, logging, checkpoints.

A recipe builds a ``Config`` and a ``Method`` and calls ``train``. The loop is the same for the
LoRA-MoE, single LoRA, prompt tuning and full fine-tune, so their numbers are comparable.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsedoc import fsio
from sparsedoc import checkpoint as ckpt
from sparsedoc.artifacts import RUN_CONFIG, RUN_SUMMARY
from sparsedoc.config import Config, config_to_dict, save_config
from sparsedoc.data.dataset import eval_batches, make_collator, prepare_data, train_loader
from sparsedoc.logging import JsonlLogger, MultiLogger, NullLogger, WandbLogger
from sparsedoc.models.load import (enable_activation_checkpointing, load_model_and_tokenizer,
                                   resolve_dtype)
from sparsedoc.train.distributed import (all_reduce_sum, barrier, build_ds_config, device,
                                         init_distributed, is_main,
                                         release_cpu_comm_buffers, zero_stage)
from sparsedoc.data.batch import model_inputs
from sparsedoc.methods.base import Method, count_parameters

log = logging.getLogger("sparsedoc")


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path
    summary: dict


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def _to_device(batch: dict, dev: torch.device) -> dict:
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(engine, batches: list[dict], dev: torch.device) -> float:
    """Token-weighted held-out LM loss over all ranks' eval batches."""
    was_training = engine.module.training
    engine.eval()
    total, count = 0.0, 0.0
    for batch in batches:
        b = _to_device(batch, dev)
        n = int((b["labels"][:, 1:] != -100).sum())
        out = engine(**model_inputs(b))  # every rank runs every batch: ZeRO-3 gathers are collective
        if n:
            total += float(out.loss) * n
            count += n
    total, count = all_reduce_sum([total, count])
    if was_training:
        engine.train()
    return total / count if count else float("nan")


def train(cfg: Config, method: Method, ds_config: str | Path) -> TrainResult:
    """Run (or resume) one training run; returns the run folder, last checkpoint and summary."""
    import deepspeed
    from transformers import set_seed

    rank, _, world = init_distributed()
    setup_logging(rank)
    dev = device()
    set_seed(cfg.train.seed)  # same seed on every rank: identical adapter init everywhere
    run_dir = Path(cfg.train.output_dir)
    dtype = resolve_dtype(cfg.model.dtype)
    ds = build_ds_config(ds_config, cfg, world, dtype)

    hf_ds_ref = None
    if zero_stage(ds) == 3:
        # Makes from_pretrained build the model already partitioned (zero.Init): an 8B model is
        # never materialised whole on every rank. Must stay alive while the model is loaded.
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds_ref = HfDeepSpeedConfig(ds)  # noqa: F841
    model, tokenizer, model_path = load_model_and_tokenizer(cfg.model, dtype)
    model = method.build(model, cfg)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    n_trainable, n_total = count_parameters(model)
    log.info("method=%s trainable params: %s of %s (%.3f%%)", method.name, f"{n_trainable:,}",
             f"{n_total:,}", 100 * n_trainable / n_total)

    data = prepare_data(cfg.data, tokenizer, cfg.train.seed, progress=is_main())
    st = data.stats
    method.check_data(cfg, st["train_labels"])
    for split in ("train", "eval"):
        s = st[split]
        log.info("data %s: %d records -> %d kept, %d shortened to max_seq_len=%d with the "
                 "target whole (%d turns dropped, %d cut inside a turn), %d skipped%s",
                 split, s["records"], s["records"] - s["skipped"], s["truncated"],
                 cfg.data.max_seq_len, s["turns_dropped"], s["turns_cut"], s["skipped"],
                 "" if not s["skipped"] else ": " + ", ".join(
                     f"{i} ({why})" for i, why in list(st["skipped_ids"][split].items())[:5])
                 + (" ..." if s["skipped"] > 5 else ""))
    log.info("data: %d train rows%s", st["train_rows"], " (packed)" if cfg.data.packing else "")
    collate = make_collator(cfg.data, tokenizer, data.label_vocab)
    loader = train_loader(data.train, collate, cfg.train.micro_batch_size, rank, world,
                          cfg.train.seed, cfg.data.num_workers, cfg.data.group_by_length)
    held_out = eval_batches(data.eval, collate, cfg.train.micro_batch_size, rank, world,
                            cfg.train.eval_batches)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=method.param_groups(model, cfg.train.lr),
        config=ds)

    # ---- resume -----------------------------------------------------------------------------
    step, epoch, batch_in_epoch, wandb_id = 0, 0, 0, ""
    resume_dir = ckpt.resolve_resume(cfg.train.resume_from, run_dir)
    if resume_dir is not None:
        state = ckpt.load_checkpoint(engine, resume_dir, rank, method.exclude_frozen_in_checkpoint)
        step, epoch = state["step"], state["epoch"]
        batch_in_epoch, wandb_id = state["batch_in_epoch"], state.get("wandb_id", "")
        log.info("resumed from %s at step %d", resume_dir, step)

    if resume_dir is None and method.calibration_batches:
        # A seeded sample across the whole training set (files are often sorted by source or
        # label); same sample on every rank, each rank takes its share. A resumed run restores
        # its calibration from the checkpoint instead.
        n = min(len(data.train), method.calibration_batches * cfg.train.micro_batch_size * world)
        sample = random.Random(cfg.train.seed).sample(data.train, n)
        calib = eval_batches(sample, collate, cfg.train.micro_batch_size, rank, world)
        method.calibrate(engine, [_to_device(b, dev) for b in calib])

    # ---- run folder and loggers (rank 0) -----------------------------------------------------
    logger = NullLogger()
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / RUN_CONFIG)
        fsio.write_json(run_dir / "ds_config.json", ds)
        fsio.write_json(run_dir / "data_stats.json", st)
        for i, manifest in enumerate(data.manifests):
            shutil.copy(manifest, run_dir / (f"data_manifest_{i}.json" if i else "data_manifest.json"))
        loggers = [JsonlLogger(run_dir / "metrics.jsonl",
                               truncate_after_step=step if resume_dir else 0)]
        if cfg.logging.wandb and cfg.logging.mode != "disabled":
            wb = WandbLogger(cfg.logging, run_dir, config_to_dict(cfg), resume_id=wandb_id)
            wandb_id = wb.run_id
            loggers.append(wb)
        logger = MultiLogger(loggers)

    def save(at_step: int) -> Path:
        state = {"step": at_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "wandb_id": wandb_id, "world_size": world, "method": method.name}

        def write_adapter(out: Path) -> None:
            trainable = [p for p in engine.module.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
                if is_main():
                    method.write_adapter(engine.module, out)

        images: dict[str, str] = {}

        def write_extras(out: Path) -> None:
            save_config(cfg, out / RUN_CONFIG)
            images.update(method.on_checkpoint(engine.module, out, at_step))

        final = ckpt.save_checkpoint(engine, run_dir, at_step, state, rank, write_adapter,
                                     write_extras, method.exclude_frozen_in_checkpoint,
                                     cfg.train.keep_last)
        for key, name in images.items():
            logger.log_image(key, final / name, at_step)
        return final

    # ---- the loop ---------------------------------------------------------------------------
    from tqdm.auto import tqdm

    t = cfg.train
    engine.train()
    bar = tqdm(total=t.max_steps, initial=step, desc=f"train {method.name}", disable=not is_main(),
               dynamic_ncols=True)
    first_eval, last_eval = None, (None, float("nan"))  # last_eval: (step, loss)
    if step == 0 and held_out:
        first_eval = evaluate_loss(engine, held_out, dev)
        last_eval = (0, first_eval)
        logger.log({"eval/loss": first_eval}, 0)
    window = {"loss": 0.0, "n": 0, "tokens": 0.0, "time": 0.0, "steps": 0}
    extra_sums: dict[str, float] = {}
    micro, last_ckpt, train_start = 0, resume_dir, time.perf_counter()
    tick = time.perf_counter()
    token_rates: list[float] = []
    step_times: list[float] = []
    end = min(t.max_steps, t.stop_at) if t.stop_at else t.max_steps
    while step < end:
        loader.sampler.set_position(epoch, batch_in_epoch)
        for batch in loader:
            batch = _to_device(batch, dev)
            loss, extras = method.compute_loss(engine, batch, step)
            engine.backward(loss)
            engine.step()
            micro += 1
            batch_in_epoch += 1
            window["loss"] += float(loss.detach())
            window["n"] += 1
            window["tokens"] += float(batch["attention_mask"].sum())
            for k, v in extras.items():
                extra_sums[k] = extra_sums.get(k, 0.0) + float(v)
            if micro % t.grad_accum:
                continue
            step += 1
            with torch.no_grad():
                method.after_optimizer_step(engine.module, step)
            bar.update(1)
            now = time.perf_counter()
            window["time"] += now - tick
            window["steps"] += 1
            tick = now
            if step % t.log_every == 0 or step == t.max_steps:
                loss_sum, n, tokens, secs = all_reduce_sum(
                    [window["loss"], window["n"], window["tokens"], window["time"]])
                metrics = {"train/loss": loss_sum / n,
                           "train/lr": engine.get_lr()[0],
                           "train/tokens_per_s": tokens / (secs / world),
                           "train/step_time_s": secs / world / window["steps"],
                           "train/epoch": epoch + batch_in_epoch / loader.sampler.batches_per_epoch}
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                metrics.update({k: v / window["n"] for k, v in extra_sums.items()})
                metrics.update(method.step_metrics(engine.module, step))
                logger.log(metrics, step)
                token_rates.append(metrics["train/tokens_per_s"])
                step_times.append(metrics["train/step_time_s"])
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                window = {"loss": 0.0, "n": 0, "tokens": 0.0, "time": 0.0, "steps": 0}
                extra_sums = {}
            if held_out and t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                last_eval = (step, evaluate_loss(engine, held_out, dev))
                logger.log({"eval/loss": last_eval[1]}, step)
                tick = time.perf_counter()  # eval time is not training time
            stopping = step >= end
            if step % t.save_every == 0 or stopping:
                last_ckpt = save(step)
                tick = time.perf_counter()
            if stopping:
                break
        else:  # the epoch ran out before max_steps
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()

    final_eval = last_eval[1]
    if held_out and last_eval[0] != step:  # not evaluated at the last step yet
        final_eval = evaluate_loss(engine, held_out, dev)
    summary = {"method": method.name, "steps": step, "world_size": world,
               "trainable_params": n_trainable, "total_params": n_total,
               "trainable_pct": 100 * n_trainable / n_total,
               "train_seconds": time.perf_counter() - train_start,
               "tokens_per_s": _median(token_rates), "step_time_s": _median(step_times),
               "eval_loss_start": first_eval, "eval_loss_final": final_eval,
               "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum,
               "max_seq_len": cfg.data.max_seq_len, "model": model_path,
               "data": {split: {k: st[split][k] for k in ("records", "truncated",
                                                          "turns_dropped", "turns_cut",
                                                          "skipped")}
                        for split in ("train", "eval")},
               "final_checkpoint": str(last_ckpt) if last_ckpt else None}
    if is_main():
        fsio.write_json(run_dir / RUN_SUMMARY, summary)  # written last: artifacts.run_finished
        logger.close()
        log.info("run folder: %s", run_dir.resolve())
        log.info("metrics:    %s", (run_dir / "metrics.jsonl").resolve())
        log.info("checkpoint: %s", Path(last_ckpt).resolve() if last_ckpt else None)
        if first_eval is not None:
            log.info("held-out loss: %.4f -> %.4f", first_eval, final_eval)
    barrier()
    release_cpu_comm_buffers()
    return TrainResult(run_dir, Path(last_ckpt) if last_ckpt else run_dir, summary)


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    return sorted(xs)[len(xs) // 2] if xs else None
