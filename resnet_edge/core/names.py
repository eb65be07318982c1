"""Names and text that come from files: the one rule for what may become a path, a URL or a config value,
and how untrusted text reaches a terminal.

A model file's ``architecture`` metadata, a served model name (--model-name, or a repository's folder),
a Triton repository's version folders and a model's ``labels`` are written by whoever made the file, not
by us. Where they enter (package, serve, a repository scan) they are checked here:

- a **name** (a folder under --out, a URL segment /v2/models/{name}, ``name:`` in config.pbtxt, a
  Kubernetes object name) is 1-63 characters of ``A-Z a-z 0-9 _ . -`` that does not start with ``.`` or
  ``-`` (Triton's model names, a single path segment: no ``/``, ``..``, spaces, quotes, control or
  non-ASCII characters); anything else is refused with one line;
- a **version** folder is a positive integer in ASCII digits with no leading zero (as Triton reads a
  repository); other folders are not versions and are skipped, except folders Python would read as
  numbers that Triton would not ('²', '٣'), which are refused;
- **labels** are exactly NUM_CLASSES names of at most 32 printable characters; others are dropped (the
  model still serves, its metadata without them).

Text from files printed on a terminal goes through :func:`printable`: control characters (ESC, and so
ANSI/OSC sequences) are escaped, and callers print it with rich's markup off.
"""

from __future__ import annotations

import json
import re
from typing import Any

from resnet_edge.core.contract import NUM_CLASSES
from resnet_edge.core.errors import UserError

NAME_RULE = "1-63 characters of A-Z a-z 0-9 _ . -, not starting with '.' or '-'"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
MAX_LABEL_CHARS = 32
SHOWN_CHARS = 60  # at most this much of an invalid value is echoed back


def is_name(value: Any) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(value: Any, what: str) -> str:
    """``value`` if it is a valid name, else a UserError that says which rule it breaks."""
    if not is_name(value):
        raise UserError(f"{what} {shown(value)} is not a valid model name ({NAME_RULE})")
    return value


def is_version(value: str) -> bool:
    """A Triton version folder: ASCII digits, no leading zero ('²' or '01' are not versions)."""
    return _VERSION.fullmatch(value) is not None


def check_labels(value: Any) -> list[str] | None:
    """The ``labels`` metadata (a JSON list) if it is NUM_CLASSES short printable strings, else None."""
    if not isinstance(value, str) or len(value) > NUM_CLASSES * (MAX_LABEL_CHARS * 6 + 4) + 2:
        return None
    try:
        labels = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(labels, list) and len(labels) == NUM_CLASSES):
        return None
    if not all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS and x.isprintable() for x in labels):
        return None
    return labels


def printable(text: Any, limit: int | None = None) -> str:
    """``text`` as safe terminal text: control characters (ESC, BEL, CR, ...) written as escapes, and cut
    to ``limit`` characters (with '...') when given. Print it with markup=False."""
    text = str(text)
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text + ("..." if cut else "")


def terminal_text(text: str) -> str:
    """:func:`printable` for whole messages: line breaks kept, every other control character escaped."""
    if text.isprintable():
        return text
    return "\n".join(printable(line) for line in text.split("\n"))


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A short, quoted, printable rendering of an untrusted value for an error message."""
    if not isinstance(value, str):
        return f"of type {type(value).__name__}"
    return repr(value[:limit]) + (f"... ({len(value):,} characters)" if len(value) > limit else "")
