"""The training loop every recipe shares: DeepSpeed step, periodic eval, logging, checkpoints.

A recipe builds a ``Config`` and a ``Method`` and calls ``train``. The loop is the same for the
LoRA-MoE, single LoRA, prompt tuning and full fine-tune, so their numbers are comparable.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Iterator
from pathlib import Path

import torch

from sparsedoc import fsio
from sparsedoc import checkpoint as ckpt
from sparsedoc.artifacts import RUN_CONFIG, RUN_SUMMARY
from sparsedoc.config import Config, config_to_dict, save_config
from sparsedoc.data.dataset import (calibration_batches, eval_batches, make_collator, prepare_data,
                                    train_loader)
from sparsedoc.logging import JsonlLogger, MultiLogger, NullLogger, WandbLogger
from sparsedoc.models.load import (enable_activation_checkpointing, is_encoder_decoder,
                                   load_model_and_tokenizer, resolve_dtype)
from sparsedoc.distributed import (all_reduce_sum, barrier, build_ds_config, device,
                                         init_distributed, is_main,
                                         release_cpu_comm_buffers, zero_stage)
from sparsedoc.data.batch import model_inputs
from sparsedoc.methods.base import Method, count_parameters
from sparsedoc.train import resume_check
from sparsedoc.train.faults import (NONFINITE_EXIT, PREEMPTED_EXIT, FaultInjector, RunStopped,
                                    SkipCounter, StopSignals, agree_on_micro_batch,
                                    nan_output_hook, nonfinite_terms)

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
    seq2seq = is_encoder_decoder(engine.module)
    for batch in batches:
        b = _to_device(batch, dev)
        # a causal LM never predicts its first label; a seq2seq decoder predicts every one
        n = int((b["labels"][:, 0 if seq2seq else 1:] != -100).sum())
        out = engine(**model_inputs(b))  # every rank runs every batch: ZeRO-3 gathers are collective
        if n:
            total += float(out.loss) * n
            count += n
    total, count = all_reduce_sum([total, count])
    if was_training:
        engine.train()
    return total / count if count else float("nan")


@dataclass
class Position:
    """Where training stands; a checkpoint stores it and a resume restores it."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    wandb_id: str = ""


class Window:
    """Sums over the micro-batches since the last log line, reduced over ranks when logged.
    The sums stay tensors on the device until then: no host sync per micro-batch."""

    def __init__(self) -> None:
        self.loss = self.tokens = self.seconds = 0.0
        self.micro_batches = self.steps = 0
        self.extras: dict[str, float | torch.Tensor] = {}

    def add(self, loss: torch.Tensor, batch: dict, extras: dict) -> None:
        self.loss = self.loss + loss.detach().float()
        self.micro_batches += 1
        self.tokens = self.tokens + batch["attention_mask"].sum()
        for k, v in extras.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else v
            self.extras[k] = self.extras.get(k, 0.0) + v

    def mean_extras(self) -> dict[str, float]:
        return {k: float(v) / self.micro_batches for k, v in self.extras.items()}

    def reduce(self, world: int) -> tuple[float, float, float]:
        """Mean loss, tokens per second and seconds per step, over all ranks."""
        loss, n, tokens, secs = all_reduce_sum([float(self.loss), self.micro_batches,
                                                float(self.tokens), self.seconds])
        return loss / n, tokens / (secs / world), secs / world / self.steps


class Trainer:
    """One training run (or its resumption), in the order it happens: ``setup`` (model, method,
    data, engine, resume, run folder), ``calibrate``, then ``step`` per micro-batch with
    ``evaluate`` and ``save`` on their schedules, and ``finish`` (summary). ``fit`` runs them.
    The method object supplies what differs between methods: build, loss, checkpoint files."""

    def __init__(self, cfg: Config, method: Method, ds_config: str | Path) -> None:
        self.cfg, self.method, self.ds_config = cfg, method, ds_config
        self.run_dir = Path(cfg.train.output_dir)
        self.pos = Position()
        self.logger = NullLogger()
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self.first_eval: float | None = None
        self.last_eval: tuple[int | None, float] = (None, float("nan"))  # (step, loss)
        self.token_rates: list[float] = []
        self.step_times: list[float] = []
        self.stop = StopSignals()  # installed by ``fit``, checked at every step boundary
        self.skips = SkipCounter()
        self.resume_plan: resume_check.ResumePlan | None = None
        self.saved_step = -1  # the step this process last saved a checkpoint at
        self.calibration_seconds = 0.0  # plan + calibrate, before the first step
        self.start = time.perf_counter()

    # ---- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed
        from transformers import set_seed

        cfg, method = self.cfg, self.method
        self.rank, _, self.world = init_distributed()
        setup_logging(self.rank)
        self.dev = device()
        set_seed(cfg.train.seed)  # same seed on every rank: identical adapter init everywhere
        dtype = resolve_dtype(cfg.model.dtype)
        self.ds = build_ds_config(self.ds_config, cfg, self.world, dtype)

        if zero_stage(self.ds) == 3:
            # Makes from_pretrained build the model already partitioned (zero.Init): an 8B model
            # is never materialised whole on every rank. Must stay alive while the model loads.
            from transformers.integrations import HfDeepSpeedConfig
            self.hf_ds_config = HfDeepSpeedConfig(self.ds)
        model, self.tokenizer, self.model_path = load_model_and_tokenizer(cfg.model, dtype)
        # The data comes before the adapter: a method may plan its adapter from training
        # batches (Sensitivity-LoRA's ranks). The RNG is forked so the adapter's initialisation
        # draws what it drew when the adapter was built straight after loading.
        with torch.random.fork_rng(devices=[self.dev] if self.dev.type == "cuda" else []):
            seq2seq = is_encoder_decoder(model)
            self.data = prepare_data(cfg.data, self.tokenizer, cfg.train.seed,
                                     progress=is_main(), seq2seq=seq2seq)
            method.check_data(cfg, self.data.stats["train_labels"])
            log_data_stats(self.data.stats, cfg)
            self.faults = FaultInjector(self.rank)
            self.record = resume_check.run_record(
                cfg, self.world, resume_check.data_hash(cfg, self.data.manifests))
            self.check_resume()  # refuses a changed world size or data before DeepSpeed starts
            self.collate = make_collator(cfg.data, self.tokenizer, self.data.label_vocab,
                                         seq2seq)
            self.plan(model)
        model = method.build(model, cfg)
        if cfg.train.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.n_trainable, self.n_total = count_parameters(model)
        log.info("method=%s trainable params: %s of %s (%.3f%%)", method.name,
                 f"{self.n_trainable:,}", f"{self.n_total:,}",
                 100 * self.n_trainable / self.n_total)
        self.loader = train_loader(self.data.train, self.collate, cfg.train.micro_batch_size,
                                   self.rank, self.world, cfg.train.seed, cfg.data.num_workers,
                                   cfg.data.group_by_length)
        self.held_out = eval_batches(self.data.eval, self.collate, cfg.train.micro_batch_size,
                                     self.rank, self.world, cfg.train.eval_batches)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=method.param_groups(model, cfg.train.lr), config=self.ds)
        self.checked_layers = method.checked_layers(self.engine.module)
        self.resume()

    def plan(self, model) -> None:
        """A method that plans its adapter from data (``Method.plan``) gets the same seeded
        sample of training batches on every rank, whatever the world size, so every rank (and
        a rerun on another cluster) decides the same; a resumed run reads the plan back."""
        self.method.configure(self.cfg)
        if not self.method.plan_batches:
            return
        start = time.perf_counter()
        if self.resumed_from is not None:
            self.method.restore_plan(self.resumed_from)
        else:
            t = self.cfg.train
            batches = calibration_batches(self.data.train, self.collate, self.method.plan_batches,
                                          t.micro_batch_size, 0, 1, t.seed)
            if self.dev.type == "cuda" and not any(hasattr(p, "ds_id")
                                                   for p in model.parameters()):
                model.to(self.dev)  # the engine would move it there anyway
            self.method.plan(model, [_to_device(b, self.dev) for b in batches])
        self.calibration_seconds += time.perf_counter() - start

    def check_resume(self) -> None:
        """Compare the checkpoint to resume from with this run (``resume_check``)."""
        self.resumed_from = ckpt.resolve_resume(self.cfg.train.resume_from, self.run_dir)
        if self.resumed_from is None:
            return
        saved_cfg = self.resumed_from / RUN_CONFIG
        self.resume_plan = resume_check.check_resume(
            ckpt.read_trainer_state(self.resumed_from), self.record,
            self.cfg.train.resume_allow_changes, self.resumed_from, zero_stage(self.ds),
            _yaml(saved_cfg) if saved_cfg.is_file() else None, config_to_dict(self.cfg))

    def resume(self) -> None:
        if self.resumed_from is None:
            return
        plan = self.resume_plan
        state = ckpt.load_checkpoint(self.engine, self.resumed_from, self.rank,
                                     self.method.exclude_frozen_in_checkpoint,
                                     load_optimizer=plan.load_optimizer)
        self.pos = Position(state["step"], state["epoch"], state["batch_in_epoch"],
                            state.get("wandb_id", ""))
        if plan.samples_per_batch_saved:  # keep the position in samples seen this epoch
            seen = self.pos.batch_in_epoch * plan.samples_per_batch_saved
            per_batch = self.cfg.train.micro_batch_size * self.world
            self.pos.batch_in_epoch = min(seen // per_batch,
                                          self.loader.sampler.batches_per_epoch)
        self.skips.total = int(state.get("skipped_steps", 0))
        method_state = ckpt.read_rank_state(self.resumed_from, self.rank)
        if method_state is not None:
            self.method.restore_state(method_state)
        self.last_checkpoint = self.resumed_from
        log.info("resumed from %s at step %d", self.resumed_from, self.pos.step)

    def open_run_folder(self) -> None:
        """Rank 0 writes the resolved config, the DeepSpeed JSON, the data report and manifests,
        and opens the loggers (W&B resumes its own run)."""
        if not is_main():
            return
        cfg, st = self.cfg, self.data.stats
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / RUN_CONFIG)
        fsio.write_json(self.run_dir / "ds_config.json", self.ds)
        fsio.write_json(self.run_dir / "data_stats.json", st)
        for i, manifest in enumerate(self.data.manifests):
            shutil.copy(manifest, self.run_dir / (f"data_manifest_{i}.json" if i
                                                  else "data_manifest.json"))
        images = self.method.write_run_files(self.run_dir)
        loggers = [JsonlLogger(self.run_dir / "metrics.jsonl",
                               truncate_after_step=self.pos.step if self.resumed_from else 0)]
        if cfg.logging.wandb and cfg.logging.mode != "disabled":
            wb = WandbLogger(cfg.logging, self.run_dir, config_to_dict(cfg),
                             resume_id=self.pos.wandb_id)
            self.pos.wandb_id = wb.run_id
            loggers.append(wb)
        self.logger = MultiLogger(loggers)
        for key, name in images.items():
            self.logger.log_image(key, self.run_dir / name, self.pos.step)
        if self.calibration_seconds:
            self.logger.log({"calibration/seconds": self.calibration_seconds}, self.pos.step)

    # ---- calibrate ------------------------------------------------------------------------
    def calibrate(self) -> None:
        """A method that calibrates before training (the MoE's routers) gets its batches from
        the data module; a resumed run restores its calibration from the checkpoint instead."""
        if self.resumed_from is not None or not self.method.calibration_batches:
            return
        t = self.cfg.train
        start = time.perf_counter()
        batches = calibration_batches(self.data.train, self.collate,
                                      self.method.calibration_batches, t.micro_batch_size,
                                      self.rank, self.world, t.seed)
        self.method.calibrate(self.engine, [_to_device(b, self.dev) for b in batches])
        self.calibration_seconds += time.perf_counter() - start

    # ---- the steps ------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        """Training micro-batches from the current position on, epoch after epoch (the sampler
        is positioned, so a resumed run continues with the batch it would have seen next)."""
        while True:
            self.loader.sampler.set_position(self.pos.epoch, self.pos.batch_in_epoch)
            for batch in self.loader:
                self.pos.batch_in_epoch += 1
                yield _to_device(batch, self.dev)
            self.pos.epoch, self.pos.batch_in_epoch = self.pos.epoch + 1, 0

    def step(self, batch: dict, window: Window) -> bool:
        """Forward, backward and DeepSpeed's step (which applies the update every
        ``grad_accum`` micro-batches) for one micro-batch. A loss that is non-finite on any
        rank (any component) skips the micro-batch on every rank before backward, so nothing
        non-finite reaches the gradients and every rank runs the same collectives; returns
        False then."""
        # faults are injected by attempt: the optimizer step being computed, skipped ones counted
        step = self.pos.step + self.skips.total + 1
        self.faults.slow(step)
        nan_in = self.faults.nan(step)
        hooks = [self.engine.module.get_submodule(m).register_forward_hook(nan_output_hook)
                 for m in nan_in if m]
        try:
            loss, extras = self.method.compute_loss(self.engine, batch, self.pos.step)
        finally:
            for h in hooks:
                h.remove()
        if "" in nan_in:
            loss = loss * float("nan")
        self.faults.kill(step, "step")
        bad = nonfinite_terms(loss, extras, self.method.loss_terms)
        layer = self.method.first_nonfinite_layer(self.engine.module) if bad else None
        verdict = agree_on_micro_batch(bad, layer, list(self.method.loss_terms),
                                       self.checked_layers)
        if verdict is not None:
            self.method.drop_micro_batch(self.engine.module)
            self.skipped(f"non-finite {', '.join(verdict.terms)} loss on rank(s) "
                         f"{', '.join(map(str, verdict.ranks))} (first non-finite layer: "
                         f"{verdict.layer or 'none found'}); the micro-batch is skipped on "
                         f"every rank")
            return False
        self.engine.backward(loss)
        self.engine.step()
        window.add(loss, batch, extras)
        return True

    def skipped(self, what: str) -> None:
        """Count and report a skipped micro-batch / update (every rank logs it); stop after
        ``train.max_consecutive_skips`` in a row."""
        self.skips.skipped()
        log.warning("step %d: %s (%d skipped in total, %d in a row of at most %d)",
                    self.pos.step + 1, what, self.skips.total, self.skips.in_a_row,
                    self.cfg.train.max_consecutive_skips)
        self.logger.log({"train/skipped_total": self.skips.total}, self.pos.step + 1)
        if self.skips.in_a_row >= self.cfg.train.max_consecutive_skips:
            self.stop_early(NONFINITE_EXIT,
                            f"{self.skips.in_a_row} non-finite steps in a row "
                            f"(train.max_consecutive_skips={self.cfg.train.max_consecutive_skips}"
                            f"); the last one: {what}. No update came from them: the checkpoint "
                            f"holds the last good weights, at the data position after the bad "
                            f"batches. Look for the cause (learning rate, data, bf16 range) "
                            f"before resuming")

    def log_window(self, window: Window) -> None:
        loss, tokens_per_s, step_time = window.reduce(self.world)
        metrics = {"train/loss": loss, "train/lr": self.engine.get_lr()[0],
                   "train/tokens_per_s": tokens_per_s, "train/step_time_s": step_time,
                   "train/skipped_total": self.skips.total,
                   "train/epoch": (self.pos.epoch + self.pos.batch_in_epoch
                                   / self.loader.sampler.batches_per_epoch)}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics.update(window.mean_extras())
        metrics.update(self.method.step_metrics(self.engine.module, self.pos.step))
        self.logger.log(metrics, self.pos.step)
        self.token_rates.append(metrics["train/tokens_per_s"])
        self.step_times.append(metrics["train/step_time_s"])
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")

    def evaluate(self) -> float:
        loss = evaluate_loss(self.engine, self.held_out, self.dev)
        self.last_eval = (self.pos.step, loss)
        self.logger.log({"eval/loss": loss}, self.pos.step)
        return loss

    def save(self) -> Path:
        """A checkpoint at the current step, through the atomic path in ``checkpoint``."""
        import deepspeed

        engine, method, at_step = self.engine, self.method, self.pos.step
        state = {"step": at_step, "epoch": self.pos.epoch,
                 "batch_in_epoch": self.pos.batch_in_epoch, "wandb_id": self.pos.wandb_id,
                 "method": method.name, "skipped_steps": self.skips.total, **self.record}

        def write_adapter(out: Path) -> None:
            trainable = [p for p in engine.module.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
                if is_main():
                    method.write_adapter(engine.module, out)

        images: dict[str, str] = {}

        def write_extras(out: Path) -> None:
            save_config(self.cfg, out / RUN_CONFIG)
            images.update(method.on_checkpoint(engine.module, out, at_step))

        final = ckpt.save_checkpoint(engine, self.run_dir, at_step, state, self.rank,
                                     write_adapter, write_extras,
                                     method.exclude_frozen_in_checkpoint, self.cfg.train.keep_last,
                                     rank_state=method.checkpoint_state(),
                                     midway=lambda: self.faults.kill(at_step, "save"))
        for key, name in images.items():
            self.logger.log_image(key, final / name, at_step)
        self.last_checkpoint, self.saved_step = final, at_step
        return final

    def stop_early(self, code: int, why: str, resave: bool = True) -> None:
        """Checkpoint the current step (collective), say where it is and how to go on, and
        raise ``RunStopped`` with exit status ``code``. No ``summary.json``: the run is not
        finished, so ``resume_from=auto`` continues it."""
        done = self.last_checkpoint is not None and self.saved_step == self.pos.step
        final = self.last_checkpoint if done and not resave else self.save()
        self.bar.close()
        resume = (f"resume with the same command plus train.resume_from=auto (output_dir "
                  f"{self.run_dir}) or train.resume_from={final}")
        message = f"stopped at step {self.pos.step}: {why}. Checkpoint: {final}; {resume}"
        (log.warning if code == PREEMPTED_EXIT else log.error)("%s (exit code %d)", message,
                                                               code)
        if is_main():
            self.logger.close()
        barrier()
        release_cpu_comm_buffers()
        raise RunStopped(code, message, final, self.pos.step)

    # ---- the run --------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self.stop.install()
        try:
            return self._fit()
        finally:
            self.stop.restore()

    def _fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        self.setup()
        self.calibrate()
        self.open_run_folder()
        t, pos = self.cfg.train, self.pos
        self.engine.train()
        self.bar = tqdm(total=t.max_steps, initial=pos.step, desc=f"train {self.method.name}",
                        disable=not is_main(), dynamic_ncols=True)
        if pos.step == 0 and self.held_out:
            self.first_eval = self.evaluate()
        end = min(t.max_steps, t.stop_at) if t.stop_at else t.max_steps
        window, micro = Window(), 0
        self.train_start = tick = time.perf_counter()
        for batch in self.batches() if pos.step < end else ():
            if not self.step(batch, window):
                continue
            micro += 1
            if micro % t.grad_accum:
                continue
            # DeepSpeed checks the gradient norm (all ranks together) and may drop the update;
            # the forwards were finite either way, so their queue keys stand
            applied = self.engine.was_step_applied()
            with torch.no_grad():
                self.method.after_optimizer_step(self.engine.module, pos.step + int(applied))
            if not applied:
                self.skipped("non-finite gradient norm; DeepSpeed dropped the update on every "
                             "rank")
                self.stop_if_asked()  # a run of dropped updates still honours a preemption
                continue
            self.skips.good_step()
            pos.step += 1
            self.bar.update(1)
            now = time.perf_counter()
            window.seconds += now - tick
            window.steps += 1
            tick = now
            if pos.step % t.log_every == 0 or pos.step == t.max_steps:
                self.log_window(window)
                window = Window()
            if self.held_out and t.eval_every and (pos.step % t.eval_every == 0
                                                   or pos.step == t.max_steps):
                self.evaluate()
                tick = time.perf_counter()  # eval time is not training time
            if pos.step % t.save_every == 0 or pos.step >= end:
                self.save()
                tick = time.perf_counter()
            if pos.step >= end:
                break
            self.stop_if_asked()
        self.bar.close()
        return self.finish()

    def stop_if_asked(self) -> None:
        """At a step boundary: a preemption signal on any rank (a collective) stops all."""
        stopped_by = self.stop.agreed()
        if stopped_by:
            self.stop_early(PREEMPTED_EXIT, "preemption notice ("
                            + ", ".join(f"{n} on rank {r}" for r, n in stopped_by.items())
                            + ")", resave=False)

    def finish(self) -> TrainResult:
        """The final held-out loss (if not just measured), the run summary, written last."""
        cfg, st, step = self.cfg, self.data.stats, self.pos.step
        final_eval = self.last_eval[1]
        if self.held_out and self.last_eval[0] != step:  # not evaluated at the last step yet
            final_eval = evaluate_loss(self.engine, self.held_out, self.dev)
        last = self.last_checkpoint
        summary = {"method": self.method.name, "steps": step, "world_size": self.world,
                   "trainable_params": self.n_trainable, "total_params": self.n_total,
                   "trainable_pct": 100 * self.n_trainable / self.n_total,
                   "train_seconds": time.perf_counter() - self.train_start,
                   # before the first step: the method's plan (Sensitivity-LoRA's Fisher
                   # estimate) and calibration; share: of the whole run, set-up to summary
                   "calibration_seconds": self.calibration_seconds,
                   "calibration_share": self.calibration_seconds
                   / max(time.perf_counter() - self.start, 1e-9),
                   "tokens_per_s": _median(self.token_rates),
                   "step_time_s": _median(self.step_times),
                   "eval_loss_start": self.first_eval, "eval_loss_final": final_eval,
                   "micro_batch_size": cfg.train.micro_batch_size,
                   "grad_accum": cfg.train.grad_accum,
                   "max_seq_len": cfg.data.max_seq_len, "model": self.model_path,
                   "data": {split: {k: st[split][k] for k in ("records", "truncated",
                                                              "turns_dropped", "turns_cut",
                                                              "skipped")}
                            for split in ("train", "eval")},
                   "final_checkpoint": str(last) if last else None,
                   **self.method.run_facts()}
        if is_main():
            fsio.write_json(self.run_dir / RUN_SUMMARY, summary)  # last: artifacts.run_finished
            self.logger.close()
            log.info("run folder: %s", self.run_dir.resolve())
            log.info("metrics:    %s", (self.run_dir / "metrics.jsonl").resolve())
            log.info("checkpoint: %s", Path(last).resolve() if last else None)
            if self.first_eval is not None:
                log.info("held-out loss: %.4f -> %.4f", self.first_eval, final_eval)
            if self.calibration_seconds:
                log.info("calibration: %.2f s, %.1f%% of the run", self.calibration_seconds,
                         100 * summary["calibration_share"])
        barrier()
        release_cpu_comm_buffers()
        return TrainResult(self.run_dir, Path(last) if last else self.run_dir, summary)


def train(cfg: Config, method: Method, ds_config: str | Path) -> TrainResult:
    """Run (or resume) one training run; returns the run folder, last checkpoint and summary."""
    return Trainer(cfg, method, ds_config).fit()


def log_data_stats(st: dict, cfg: Config) -> None:
    """What the data path kept, shortened and skipped, per split (skipped records by id)."""
    for split in ("train", "eval"):
        s = st[split]
        skipped = list(st["skipped_ids"][split].items())
        log.info("data %s: %d records -> %d kept, %d shortened to max_seq_len=%d with the "
                 "target whole (%d turns dropped, %d cut inside a turn), %d skipped%s",
                 split, s["records"], s["records"] - s["skipped"], s["truncated"],
                 cfg.data.max_seq_len, s["turns_dropped"], s["turns_cut"], s["skipped"],
                 "" if not s["skipped"] else ": " + ", ".join(
                     f"{i} ({why})" for i, why in skipped[:5])
                 + (" ..." if s["skipped"] > 5 else ""))
    log.info("data: %d train rows%s", st["train_rows"], " (packed)" if cfg.data.packing else "")


def _yaml(path: Path) -> dict | None:
    import yaml

    try:
        out = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return out if isinstance(out, dict) else None


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    return sorted(xs)[len(xs) // 2] if xs else None
