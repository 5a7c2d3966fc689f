"""``python -m data_prep.cmb``; the converter is sparsedoc/prep/cmb.py."""

from sparsedoc.prep.cmb import main

if __name__ == "__main__":
    raise SystemExit(main())
