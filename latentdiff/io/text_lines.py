"""Text files of one item per line (prompts, captions, a caption vocabulary), read strictly: UTF-8 text without
control characters, or one clear error. A binary file given by mistake is refused, not taken for prompts.

    prompts = read_lines("prompts.txt")   # the stripped, non-empty lines
"""

from __future__ import annotations

import re
from pathlib import Path

# C0 control characters other than tab, line feed, form feed and carriage return, and DEL: never in a text file
_BINARY = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def read_lines(path: str | Path) -> list[str]:
    """The stripped, non-empty lines of a UTF-8 text file. Raises ValueError (with the reason, not the path: the
    caller names the file and its role) for an unreadable file, bytes that are not UTF-8, or control characters
    (a binary file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot be read ({e.strerror or e})") from None
    bad = _BINARY.search(text)
    if bad:
        raise ValueError(f"not a text file (control character {bad.group()!r} at character {bad.start()})")
    return [line.strip() for line in text.splitlines() if line.strip()]
