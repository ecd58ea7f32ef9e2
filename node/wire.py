"""Values that arrive from the network: how they are checked and how they are logged.

Anything a peer sends (UIDs, AE titles, element values, the text of a decoding
error) may hold control characters, NUL or bytes of another character set.
:func:`escape` turns such a value into one printable ASCII line, and
:class:`EscapeWireValues` applies it to every string argument of a log record,
so a newline in an Affected SOP Instance UID can never start a forged line in
the node's log.

:func:`uid_problem` says why a UID breaks PS3.5 9.1 (more than 64 characters,
a character other than ``0-9`` and ``.``, an empty component); the receiver
refuses such instances instead of shortening or rewriting their UIDs.
"""

from __future__ import annotations

import logging
import re
import traceback

#: PS3.5 9.1: at most 64 characters.
UID_MAX_LENGTH = 64

# Components of digits separated by single dots. Leading zeros in a component
# break PS3.5 9.1 too, but real scanners and PACS still emit them (e.g.
# "1.2.840.113619.2.55.3.0123..." in old archives), and they do not make two
# UIDs collide, so they are accepted.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_CHARS = re.compile(r"[0-9.]*")

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape(value: object) -> str:
    """Return ``value`` as one line of printable ASCII.

    Control characters, DEL and everything outside ASCII are written as
    Python-style escapes (``\\n``, ``\\x00``, ``\\xe9``, ``\\u20ac``), a
    backslash as ``\\\\``; bytes are read as Latin-1 first, so every byte
    shows. Printable ASCII is unchanged, so ordinary UIDs and AE titles read
    as they are.
    """
    text = value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def uid_problem(value: str) -> str | None:
    """Return why ``value`` is not a UID of PS3.5 9.1, or ``None`` when it is one.

    Checked: 1 to 64 characters, only ``0-9`` and ``.``, no empty component
    (no leading, trailing or doubled dot). Leading zeros are accepted (see the
    module notes).
    """
    if not value:
        return "empty"
    if len(value) > UID_MAX_LENGTH:
        return f"{len(value)} characters (at most {UID_MAX_LENGTH})"
    if not _UID_CHARS.fullmatch(value):
        return "characters other than 0-9 and '.'"
    if not _UID.fullmatch(value):
        return "an empty component"
    return None


class EscapeWireValues(logging.Filter):
    """Make a log record print as one line whatever the peer sent.

    Every string, bytes or exception argument goes through :func:`escape`;
    numbers keep their type, so ``%d`` still works. A record without
    arguments (pynetdicom and pydicom log f-strings that already hold the
    peer's values) has its message escaped instead. With ``exc_info``, the
    exception's message is escaped; the stack lines are the node's own code.
    Attach it with :func:`escape_wire_logs`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops a record."""
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(_escaped(a) for a in args)
        elif isinstance(args, dict) and args:
            record.args = {k: _escaped(v) for k, v in args.items()}
        else:
            record.msg = escape(record.msg)
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            exc_type, exc, tb = record.exc_info
            stack = "".join(traceback.format_tb(tb)) if tb is not None else ""
            last = escape("".join(traceback.format_exception_only(exc_type, exc)).rstrip("\n"))
            record.exc_text = f"Traceback (most recent call last):\n{stack}{last}"
        return True


#: Loggers that log values taken from the wire: the node's own (the receiver,
#: the scheduler's routing reasons name a series' Modality or descriptions), the
#: storage layer, and the DICOM libraries (pynetdicom logs invalid UIDs
#: verbatim, pydicom invalid element values).
WIRE_LOGGERS = ("node", "storage", "pynetdicom", "pydicom")


def escape_wire_logs(prefixes: tuple[str, ...] = WIRE_LOGGERS) -> None:
    """Attach one :class:`EscapeWireValues` to each logger under ``prefixes``.

    A logger's filter sees only the records logged on that logger, not those
    of its children, so every existing logger of those namespaces gets one
    (pynetdicom and pydicom create theirs when imported). Calling it again
    adds no second filter.
    """
    names = set(prefixes) | {
        name
        for name in logging.root.manager.loggerDict
        if any(name.startswith(prefix + ".") for prefix in prefixes)
    }
    for name in sorted(names):
        target = logging.getLogger(name)
        if not any(isinstance(f, EscapeWireValues) for f in target.filters):
            target.addFilter(EscapeWireValues())


def _escaped(arg: object) -> object:
    if isinstance(arg, str | bytes | bytearray | BaseException):
        return escape(arg)
    return arg
