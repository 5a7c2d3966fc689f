"""``python -m data_prep.chinese_medical_dialogue``; the converter is sparsedoc/prep/chinese_medical_dialogue.py."""

from sparsedoc.prep.chinese_medical_dialogue import main

if __name__ == "__main__":
    raise SystemExit(main())
