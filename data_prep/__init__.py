"""Entry points for the converters in a checkout: ``python -m data_prep.<name> --src ... --out ...``.

The code lives in ``sparsedoc.prep`` (``python -m sparsedoc.prep.<name>`` and
``sparsedoc prepare NAME`` do the same after ``pip install sparsedoc``).
"""
