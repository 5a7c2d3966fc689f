"""``python -m data_prep.sumpubmed``; the converter is sparsedoc/prep/sumpubmed.py."""

from sparsedoc.prep.sumpubmed import main

if __name__ == "__main__":
    raise SystemExit(main())
