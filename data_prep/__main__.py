"""``python -m data_prep prepare ...`` (same as ``sparsedoc prepare ...``)."""

from data_prep.cli import main

raise SystemExit(main())
