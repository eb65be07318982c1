"""The one exception type for mistakes a user can make; the CLI turns it into `error: ...` and exit 1."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, bad option, missing file or hardware: the message alone tells the user what to fix."""
