"""``python -m data_prep.pubmedqa``; the converter is sparsedoc/prep/pubmedqa.py."""

from sparsedoc.prep.pubmedqa import main

if __name__ == "__main__":
    raise SystemExit(main())
