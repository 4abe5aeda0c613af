"""Text from outside (file, folder and tensor names, error messages) made safe for a terminal.

A name is printed as the characters it holds, never as instructions: control characters are shown as
escapes (``\\n``, ``\\t``, ``\\x1b``, ``\\x9b``, ``\\u202e``, ``\\udcff``), so a line stays one line and
no escape sequence in a file name moves the cursor, recolours the terminal or sets its title. The
rich console of the CLI (``cli._console``) prints strings literally (no markup, no emoji codes, no
highlighting), so ``[/red]`` in a name is just text.
"""

from __future__ import annotations

import re

__all__ = ["human_bytes", "visible"]

# C0 controls and DEL, C1 controls (0x9b is a one-byte CSI on some terminals), the line and paragraph
# separators, bidirectional overrides and isolates (they reorder what follows on the screen: CVE-2021-42574)
# and lone surrogates (undecodable bytes of a file name under surrogateescape; they cannot be encoded
# as UTF-8 and would end a print with UnicodeEncodeError).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def visible(text: object) -> str:
    """``str(text)`` with every control character shown as an escape: one line, no terminal control.

    Idempotent (the escapes are printable), so text made visible twice reads the same.
    """
    return _UNSAFE.sub(_escape, str(text))


def human_bytes(nbytes: float) -> str:
    """A size for people: ``4.9 GB``, ``132.0 KB``, ``12 B`` (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"
