"""The one exception family for bad input: what a user wrote, pointed at, or downloaded.

Every refusal of a config, data file, model path, DeepSpeed JSON or artifact folder raises a
subclass of ``UserError`` whose message names the file and the field, says what was expected
and, where there is one, how to fix it. The command-line entry points catch ``UserError`` and
print the message (exit status 2) instead of a traceback; anything else escaping is a bug.
The subclasses keep their historic built-in bases (``ValueError``, ``FileNotFoundError``), so
callers that catch those still work. A leaf module: it imports nothing from sparsedoc.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, refused with a message that names the file / field and the expectation."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder that the input names does not exist."""
