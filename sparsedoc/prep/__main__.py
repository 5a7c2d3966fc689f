"""``python -m sparsedoc.prep prepare ...`` (same as ``sparsedoc prepare ...``)."""

from sparsedoc.prep.cli import main

raise SystemExit(main())
