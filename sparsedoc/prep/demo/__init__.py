"""The project's own small bilingual demo dataset (facts.py -> build.py -> train/eval JSONL)."""
