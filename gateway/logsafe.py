"""Values from outside (the wire, file names) as they may appear in a log line.

A peer chooses its AE title and UIDs, an AI tool its job names: printed raw, a newline or an
escape sequence in one of them would forge log lines or rewrite the terminal. Every such
value is logged through ``wire``.
"""

from __future__ import annotations

import logging

_LIMIT = 128


def wire(value: object, limit: int = _LIMIT) -> str:
    """``value`` with backslashes and everything outside printable ASCII escaped, cut to ``limit``.

    Printable ASCII passes unchanged (a UID or an AE title reads as itself); anything else
    becomes ``\\xNN``/``\\uNNNN``, so one value is always one piece of one line.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit]
        cut = True
    else:
        cut = False
    if text.isascii() and text.isprintable() and "\\" not in text:
        escaped = text
    else:
        out = []
        for ch in text:
            code = ord(ch)
            if ch == "\\":
                out.append("\\\\")
            elif 0x20 <= code < 0x7F:
                out.append(ch)
            elif code <= 0xFF:
                out.append(f"\\x{code:02x}")
            elif code <= 0xFFFF:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
        escaped = "".join(out)
    return escaped + "..." if cut else escaped


_CONTROLS = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F)}
_CONTROLS.update({i: f"\\x{i:02x}" for i in range(0x80, 0xA0)})
_CONTROLS.update({0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\x85"})


class OneLineFormatter(logging.Formatter):
    """Every message stays one line, whatever a library or a forgotten call site put in it.

    Control characters in the message become ``\\xNN``; a traceback (DEBUG) still follows
    on its own lines. The values we log from outside go through ``wire`` first anyway.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_CONTROLS)
        return super().formatMessage(record)
