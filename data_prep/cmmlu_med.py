"""``python -m data_prep.cmmlu_med``; the converter is sparsedoc/prep/cmmlu_med.py."""

from sparsedoc.prep.cmmlu_med import main

if __name__ == "__main__":
    raise SystemExit(main())
