"""``python -m data_prep.cmexam``; the converter is sparsedoc/prep/cmexam.py."""

from sparsedoc.prep.cmexam import main

if __name__ == "__main__":
    raise SystemExit(main())
