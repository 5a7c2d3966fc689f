"""Step time and memory of every method side by side: ``sparsedoc bench``
(code: sparsedoc/bench/).

    python recipes/benchmark.py --preset smollm2
"""

from sparsedoc.bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
