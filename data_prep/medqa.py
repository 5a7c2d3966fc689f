"""``python -m data_prep.medqa``; the converter is sparsedoc/prep/medqa.py."""

from sparsedoc.prep.medqa import main

if __name__ == "__main__":
    raise SystemExit(main())
