"""``python -m data_prep.mts_dialog``; the converter is sparsedoc/prep/mts_dialog.py."""

from sparsedoc.prep.mts_dialog import main

if __name__ == "__main__":
    raise SystemExit(main())
