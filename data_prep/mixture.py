"""``python -m data_prep.mixture``; the converter is sparsedoc/prep/mixture.py."""

from sparsedoc.prep.mixture import main

if __name__ == "__main__":
    raise SystemExit(main())
