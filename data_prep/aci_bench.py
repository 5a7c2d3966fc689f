"""``python -m data_prep.aci_bench``; the converter is sparsedoc/prep/aci_bench.py."""

from sparsedoc.prep.aci_bench import main

if __name__ == "__main__":
    raise SystemExit(main())
