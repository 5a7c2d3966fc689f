"""What sparsedoc deserialises from a checkpoint, adapter or export folder: never a pickle
that can run code.

Weights come from safetensors (models, exports, every adapter sparsedoc writes) or from
``torch.load(weights_only=True)``, which transformers and peft use for ``*.bin`` files and
sparsedoc for its RNG state. DeepSpeed's own checkpoint files (``*_model_states.pt``,
``*_optim_states.pt``) are pickles that DeepSpeed opens with ``weights_only=False``, so around
each of its loads (resume, consolidating a full fine-tune) sparsedoc

1. checks every torch file of the folder statically (``check_torch_files``): the pickle's
   globals are read without running it, and a file that is not a ``torch.save`` zip, or that
   names any global beyond torch's weights-only set and the DeepSpeed classes below, is refused
   with the file and the globals named;
2. runs DeepSpeed's loads with weights-only forced on (``weights_only_loads``: torch's
   ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), the same classes allowed, so even a file swapped in after
   the check cannot run code.

Adapter and model folders get the same static check before peft or transformers open them
(``check_weight_files``), and their safetensors files are checked whole (a truncated copy is
refused with its name, not with a deserialiser's traceback).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Iterator

from sparsedoc.errors import UserError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# What DeepSpeed's ZeRO optimizer state holds besides tensors and plain containers: plain data
# classes and an enum, no code runs when they are rebuilt. Extend only with classes of that kind.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeFileError(UserError):
    """A file that could run code when loaded, or that cannot be checked, was refused."""


class CorruptFileError(UserError, ValueError):
    """A weights file that is truncated or unreadable."""


def safetensors_problem(file: Path, names: set[str] | None = None) -> str | None:
    """Why ``file`` is not a complete safetensors file (``None`` when it is): the header parses
    and the data it declares is all there (safetensors checks the size, so a truncated copy is
    caught), it holds at least one tensor, and every name in ``names``. Reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # noqa: BLE001  (SafetensorError, OSError: both mean unusable)
        return (f"weights unreadable: {file.name}: {e} (truncated by an interrupted copy or "
                f"download?)")
    if not keys:
        return f"weights empty: {file.name}"
    if names and names - keys:
        return f"weights incomplete: {file.name} lacks {sorted(names - keys)[:3]}"
    return None


def check_weight_files(folder: str | Path) -> None:
    """Refuse an adapter, checkpoint or model folder before anything in it is loaded: a
    torch file that could run code (``check_torch_files``) or a safetensors file that is
    truncated or unreadable (``safetensors_problem``). Top level of ``folder`` only.

    Raises:
        UnsafeFileError: a torch file that could run code.
        CorruptFileError: a damaged safetensors file.
    """
    folder = Path(folder)
    check_torch_files(folder)
    for f in sorted(folder.glob("*.safetensors")):
        why = safetensors_problem(f)
        if why:
            raise CorruptFileError(f"{folder}: {why}")


def _deepspeed_classes() -> list[type]:
    import importlib

    out = []
    for name in DEEPSPEED_GLOBALS:
        module, attr = name.rsplit(".", 1)
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: not allowed, then
            pass
    return out


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals a ``torch.save`` file names beyond the weights-only set and
    ``DEEPSPEED_GLOBALS``; read statically, nothing in the file runs.

    Raises:
        UnsafeFileError: not a ``torch.save`` zip file (a raw pickle, a legacy or torchscript
            file) or a pickle that uses opcodes the weights-only unpickler does not accept.
    """
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
        raise UnsafeFileError(
            f"{path}: refused, not a torch.save zip file whose pickle can be checked without "
            f"running it ({str(e).splitlines()[0] if str(e) else type(e).__name__}); sparsedoc "
            f"never unpickles such a file") from None
    return sorted(set(found) - set(DEEPSPEED_GLOBALS))


def check_torch_files(folder: str | Path, recursive: bool = False) -> None:
    """Refuse ``folder`` if any of its torch files (``*.pt``, ``*.pth``, ``*.bin``, ``*.ckpt``)
    could run code when unpickled. Only pickle headers are read.

    Raises:
        UnsafeFileError: naming the file and the globals it would import and call.
    """
    folder = Path(folder)
    files = folder.rglob("*") if recursive else folder.iterdir()
    for f in sorted(files):
        if f.suffix in TORCH_SUFFIXES and f.is_file():
            bad = unsafe_globals(f)
            if bad:
                raise UnsafeFileError(
                    f"{f}: refused, its pickle would import and call {', '.join(bad[:5])}"
                    f"{' ...' if len(bad) > 5 else ''}, which loading weights never needs "
                    f"(a tampered or foreign file?); sparsedoc does not unpickle it")


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only, whatever its caller passes (DeepSpeed asks
    for ``weights_only=False``), with ``DEEPSPEED_GLOBALS`` allowed. A refused file raises
    ``UnsafeFileError``."""
    import torch

    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_classes()):
            yield
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else "unpickling refused"
        raise UnsafeFileError(f"refused a checkpoint file that is not weights only: {first}") \
            from None
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old
