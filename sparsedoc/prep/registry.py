"""Every dataset ``sparsedoc prepare`` knows: name -> converter module, task, language, license.

Licenses are quoted from each release; ``non_commercial`` is set where the data may only be used
for research (a license term or an explicit README restriction), so cards and mixture manifests
can flag it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    module: str  # data_prep.<module>
    title: str
    kind: str  # "mcq" or "chat": what the converter writes
    task: str  # meta.task of chat records ("mcq" for MCQ sets)
    lang: str
    license: str
    non_commercial: bool
    homepage: str
    hf_id: str | None = None  # a hub id the converter knows how to read
    label: str = ""  # what meta.label holds, for the card
    cli_args: tuple[str, ...] = ()  # preset converter options (one module, several datasets)


REGISTRY: dict[str, DatasetInfo] = {i.name: i for i in [
    DatasetInfo("cmexam", "cmexam", "CMExam (Chinese National Medical Licensing Examination)",
                "mcq", "mcq", "zh",
                "Apache-2.0; README: academic/research use only, commercial misuse prohibited",
                True, "https://github.com/williamliujl/CMExam", "fzkuji/CMExam",
                "clinical department (annotated test split), else medical discipline"),
    DatasetInfo("cmmlu_med", "cmmlu_med", "CMMLU, medical and clinical subjects", "mcq", "mcq",
                "zh", "CC BY-NC-SA 4.0", True, "https://github.com/haonan-li/CMMLU",
                "haonan-li/cmmlu", "CMMLU subject (e.g. clinical_knowledge)"),
    DatasetInfo("cmb", "cmb", "CMB (Chinese Medical Benchmark): Exam or Clin, as found in --src",
                "mcq|chat", "mcq|clinical_qa", "zh", "Apache-2.0", False,
                "https://github.com/FreedomIntelligence/CMB", "FreedomIntelligence/CMB",
                "see cmb_exam / cmb_clin"),
    DatasetInfo("cmb_exam", "cmb", "CMB-Exam (Chinese Medical Benchmark, multiple choice)", "mcq",
                "mcq", "zh", "Apache-2.0", False, "https://github.com/FreedomIntelligence/CMB",
                "FreedomIntelligence/CMB", "exam subject (department)", ("--part", "exam")),
    DatasetInfo("cmb_clin", "cmb", "CMB-Clin (Chinese Medical Benchmark, clinical case QA)",
                "chat", "clinical_qa", "zh", "Apache-2.0", False,
                "https://github.com/FreedomIntelligence/CMB", "FreedomIntelligence/CMB",
                "textbook chapter of the case, where the title names one", ("--part", "clin")),
    DatasetInfo("pubmedqa", "pubmedqa", "PubMedQA PQA-L (expert-labelled yes/no/maybe)", "chat",
                "qa", "en", "MIT", False, "https://github.com/pubmedqa/pubmedqa",
                "qiaojin/PubMedQA", "none (meta.answer holds yes/no/maybe)"),
    DatasetInfo("medqa", "medqa", "MedQA (USMLE and Chinese medical licensing exams)", "mcq",
                "mcq", "en", "MIT", False, "https://github.com/jind11/MedQA",
                "GBaker/MedQA-USMLE-4-options", "exam step (meta_info)"),
    DatasetInfo("mts_dialog", "mts_dialog", "MTS-Dialog (conversation -> clinical note section)",
                "chat", "dialogue2note", "en", "CC BY 4.0", False,
                "https://github.com/abachaa/MTS-Dialog", None, "note section (e.g. GENHX)"),
    DatasetInfo("aci_bench", "aci_bench", "ACI-Bench (encounter -> full visit note)", "chat",
                "dialogue2note", "en", "CC BY 4.0", False, "https://github.com/wyim/aci-bench",
                None, "none (meta.subset holds aci/virtassist/virtscribe)"),
    DatasetInfo("sumpubmed", "sumpubmed", "SumPubMed (PubMed article -> abstract)", "chat",
                "summarization", "en",
                "MIT; README: non-commercial academic purpose", True,
                "https://github.com/vgupta123/sumpubmed", None, "none"),
    DatasetInfo("chinese_medical_dialogue", "chinese_medical_dialogue",
                "Chinese medical dialogue data (Toyhom), patient question -> doctor answer",
                "chat", "dialogue", "zh", "MIT (user-generated online consultations)", False,
                "https://github.com/Toyhom/Chinese-medical-dialogue-data", None, "department"),
    DatasetInfo("bentsao", "bentsao", "BenTsao / Huatuo-Llama-Med-Chinese instruction data",
                "chat", "instruction", "zh",
                "Apache-2.0 (code); README: academic research only, commercial use strictly "
                "prohibited", True, "https://github.com/SCIR-HI/Huatuo-Llama-Med-Chinese", None,
                "none"),
]}

ALIASES = {"cmmlu": "cmmlu_med", "medqa_usmle": "medqa", "mts": "mts_dialog", "aci": "aci_bench",
           "toyhom": "chinese_medical_dialogue", "huatuo": "bentsao",
           "bentsao_huatuo_llama_med": "bentsao"}


def resolve(name: str) -> str:
    """The registry name for ``name`` or an alias (case and hyphens ignored).

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))} "
                       f"(aliases: {', '.join(sorted(ALIASES))})")
    return key


def get_info(name: str) -> DatasetInfo:
    """The registry entry of ``name`` (or an alias)."""
    return REGISTRY[resolve(name)]


def load_converter(name: str) -> ModuleType:
    """The converter module of ``name``, imported on demand (keeps ``prepare list`` light)."""
    return importlib.import_module(f"sparsedoc.prep.{get_info(name).module}")
