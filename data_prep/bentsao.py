"""``python -m data_prep.bentsao``; the converter is sparsedoc/prep/bentsao.py."""

from sparsedoc.prep.bentsao import main

if __name__ == "__main__":
    raise SystemExit(main())
