"""Process-group set-up and the DeepSpeed JSON, filled from our config.

Works the same under the ``deepspeed`` launcher (which sets RANK/WORLD_SIZE/MASTER_* and passes
``--local_rank``) and as a plain ``python recipes/...`` single process. CPUs use gloo, GPUs NCCL.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparsedoc.config import Config, ConfigError
from sparsedoc.resources import ds_config_path


def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT / --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed once; return ``(rank, local_rank, world_size)``."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python recipe.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank(), local_rank, dist.get_world_size()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo takes CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, returned on ``t``'s device (fp64 stays fp64)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    moved = t.detach().to(_comm_device()).contiguous()
    dist.all_reduce(moved)
    return moved.to(t.device)


def all_reduce_sum(values: list[float]) -> list[float]:
    return all_reduce_tensor(torch.tensor(values, dtype=torch.float64)).tolist()


def release_cpu_comm_buffers() -> None:
    """Unlink this rank's shared-memory all-reduce buffer of DeepSpeed's CPU backend.

    DeepSpeed 0.19 on the CPU accelerator maps a 64 MiB ``/dev/shm`` file per rank per run and
    never unlinks it; /dev/shm is RAM, so repeated runs (tests, sweeps) slowly eat memory. Call
    after the last collective: unlinking keeps existing mappings valid."""
    if torch.cuda.is_available() or not dist.is_initialized():
        return
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    pattern = f"deepspeed_allreduce_buffer_*_{addr}_{port}_{dist.get_rank()}"
    for f in Path("/dev/shm").glob(pattern):
        f.unlink(missing_ok=True)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# DeepSpeed JSON: our config is the single source of truth for batch sizes, precision,
# optimizer and schedule. "auto" means "fill from the sparsedoc config"; an explicit value that
# disagrees with the config is an error, and no "auto" may survive.

_SECTIONS = ("bf16", "fp16", "optimizer", "optimizer.params", "scheduler", "scheduler.params",
             "zero_optimization", "zero_optimization.offload_optimizer",
             "zero_optimization.offload_param")
_SCHEDULERS = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}


def _check_or_fill(node: dict, key: str, value: Any, where: str) -> None:
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value:
        raise ConfigError(f"{where}.{key} is {current!r} but the sparsedoc config gives {value!r}; "
                          f"set it to \"auto\" (filled from the config) or change the config")


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if node == "auto" else []


def build_ds_config(template: dict | str | Path, cfg: Config, world_size: int,
                    dtype: torch.dtype) -> dict:
    """Fill a DeepSpeed config template from ``cfg``; reject unresolved or conflicting values."""
    src = str(template) if not isinstance(template, dict) else "ds_config"
    if not isinstance(template, dict):
        path = ds_config_path(str(template))
        try:
            template = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; expected a DeepSpeed JSON file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(template, dict):
        raise ConfigError(f"{src}: expected a JSON object of DeepSpeed settings, got "
                          f"{type(template).__name__}")
    for dotted in _SECTIONS:  # sections the filling below reads must be objects when present
        node: Any = template
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            raise ConfigError(f"{src}.{dotted}: expected a JSON object, got {node!r:.40}")
    ds = copy.deepcopy(template)
    t = cfg.train
    _check_or_fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, src)
    _check_or_fill(ds, "gradient_accumulation_steps", t.grad_accum, src)
    global_batch = t.micro_batch_size * t.grad_accum * world_size
    if ds.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ConfigError(f"{src}.train_batch_size is {ds['train_batch_size']!r} but it must be "
                          f"train.micro_batch_size {t.micro_batch_size} x train.grad_accum "
                          f"{t.grad_accum} x {world_size} rank(s) = {global_batch}; set it to "
                          f"\"auto\" (filled from the config) or change the config")
    _check_or_fill(ds, "train_batch_size", global_batch, src)
    _check_or_fill(ds, "gradient_clipping", t.max_grad_norm, src)
    for name, want in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = ds.setdefault(name, {"enabled": "auto"})
        _check_or_fill(section, "enabled", want, f"{src}.{name}")
    if ds.get("fp16", {}).get("enabled"):
        ds["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling

    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    _check_or_fill(params, "lr", t.lr, f"{src}.optimizer.params")
    _check_or_fill(params, "weight_decay", t.weight_decay, f"{src}.optimizer.params")
    params.setdefault("betas", [0.9, 0.999])
    params.setdefault("eps", 1e-8)
    zero = ds.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if not torch.cuda.is_available() and not offload:
        params.setdefault("torch_adam", True)  # FusedAdam is CUDA-only; plain torch AdamW on CPU

    sched = ds.setdefault("scheduler", {"type": "auto", "params": {}})
    _check_or_fill(sched, "type", _SCHEDULERS[t.lr_schedule], f"{src}.scheduler")
    sp = sched.setdefault("params", {})
    # DeepSpeed needs warmup_num_steps >= 1; no warmup = a one-step "warmup" already at full lr
    warmup = max(1, min(t.warmup_steps, t.max_steps))
    start = 0.0 if t.warmup_steps > 0 else 1.0  # first-step lr as a fraction of train.lr
    if sched["type"] == "WarmupLR":
        fills = {"warmup_min_lr": start * t.lr, "warmup_max_lr": t.lr, "warmup_num_steps": warmup,
                 "warmup_type": "linear"}
    elif sched["type"] == "WarmupDecayLR":
        fills = {"warmup_min_lr": start * t.lr, "warmup_max_lr": t.lr, "warmup_num_steps": warmup,
                 "total_num_steps": t.max_steps, "warmup_type": "linear"}
    else:  # WarmupCosineLR expresses lr as ratios of the optimizer's lr
        fills = {"warmup_min_ratio": start, "cos_min_ratio": 0.1, "warmup_num_steps": warmup,
                 "total_num_steps": t.max_steps, "warmup_type": "linear"}
    for k, v in fills.items():
        _check_or_fill(sp, k, v, f"{src}.scheduler.params")

    stage = zero.get("stage", 0)
    if stage == 3:
        for k in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                  "reduce_bucket_size"):
            if zero.get(k) == "auto":
                zero[k] = int(5e7) if k != "stage3_param_persistence_threshold" else int(1e5)
    for k in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(k) == "auto":
            zero[k] = int(5e8)
    ds.setdefault("steps_per_print", 10**9)  # our logger reports; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"{src}: unresolved \"auto\" at {', '.join(leftover)}; sparsedoc fills "
                          f"batch size, accumulation, precision, optimizer and scheduler values "
                          f"only; set these explicitly")
    _check_deepspeed(ds, src)
    return ds


class _OneRank:
    """The data-parallel size DeepSpeed's config validation sees (see ``_check_deepspeed``)."""

    def get_data_parallel_world_size(self) -> int:
        return 1


def _check_deepspeed(ds: dict, src: str) -> None:
    """Refuse what DeepSpeed would refuse later, deep inside ``deepspeed.initialize`` (its own
    validation: unknown or ill-typed keys, a ZeRO stage above 3, fp16 and bf16 together,
    ``gradient_allreduce_op: sum`` under ZeRO-3), and the combinations it silently ignores:
    ``offload_param`` (a ZeRO-3 feature) under stage 0-2, NVMe offload without a path."""
    from deepspeed.runtime.config import DeepSpeedConfig

    zero = ds.get("zero_optimization", {})
    # The batch sizes were checked above for the real world size; DeepSpeed validates a
    # one-rank copy, so a dry run on a laptop checks a cluster's JSON the same way.
    probe = dict(ds, train_batch_size=ds["train_micro_batch_size_per_gpu"]
                 * ds["gradient_accumulation_steps"])
    try:
        DeepSpeedConfig(probe, mpu=_OneRank())
    except Exception as e:  # noqa: BLE001  pydantic ValidationError, AssertionError, ValueError
        errors = getattr(e, "errors", None)
        if callable(errors):  # pydantic: the offending key and why
            first = errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            msg = f"zero_optimization.{where}: {first.get('msg')}" if where else first.get("msg")
        else:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{src}: DeepSpeed rejects it: {msg}") from None
    stage = int(zero.get("stage", 0))
    if stage < 3 and zero.get("offload_param"):
        raise ConfigError(f"{src}.zero_optimization.offload_param: offloading parameters needs "
                          f"ZeRO stage 3 (stage {stage} keeps every parameter on every GPU and "
                          f"DeepSpeed would ignore it); set stage 3 or remove offload_param")
    for key in ("offload_param", "offload_optimizer"):
        section = zero.get(key) or {}
        if section.get("device") == "nvme" and not section.get("nvme_path"):
            raise ConfigError(f"{src}.zero_optimization.{key}: device nvme needs nvme_path (a "
                              f"folder on a local NVMe drive)")


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every rank along dim 0, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    moved = t.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, moved)
    return torch.cat(parts).to(t.device)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """``all_gather_cat`` for tensors whose first dimension differs between ranks (rows of
    (n, ...)): pads to the longest, gathers, and drops the padding, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    sizes = all_gather_cat(torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)).tolist()
    longest = max(sizes)
    padded = torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])])
    parts = all_gather_cat(padded).split(longest)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
