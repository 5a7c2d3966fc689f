"""Secrets stay out of everything sparsedoc saves, prints or logs.

Record text is kept out by construction (loggers take numbers and images; evaluation writes
text only with ``logging.log_samples``). Secrets are the environment's: ``WANDB_API_KEY``,
``HF_TOKEN`` and any variable whose name ends in ``_TOKEN``, ``_KEY``, ``_SECRET`` or
``_PASSWORD``. sparsedoc never copies the environment into a file; ``redact_secrets`` is the
second line: any config value that contains one of those values is replaced before the config
is written (``config.yaml``), printed (``--dry-run``) or sent to W&B.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_NAME = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD)$|^(WANDB_API_KEY|HF_TOKEN)$",
                         re.IGNORECASE)
REDACTED = "<redacted: environment secret>"
MIN_SECRET_LEN = 8  # shorter values ("1", "true") are settings, not secrets


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    """The values of the environment's secret-named variables, longest first."""
    env = os.environ if env is None else env
    found = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(found, key=len, reverse=True)


def redact_secrets(obj: Any, secrets: list[str] | None = None) -> Any:
    """``obj`` (nested dicts / lists / strings) with every string that contains a secret
    replaced by ``REDACTED``."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, dict):
        return {k: redact_secrets(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_secrets(v, secrets) for v in obj)
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return REDACTED
    return obj
