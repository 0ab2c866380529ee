# -*- test-case-name: tests.unit.test_tlsfilecheck -*-
"""
Files the operator names (rule files, TLS keys and certificates), checked
before they are read: a device such as C{/dev/zero} would be read for ever,
filling memory, and a FIFO would block start-up until some other process
wrote to it.
"""

from __future__ import annotations

import os
import stat

MAX_TLS_FILE_BYTES = 1024 * 1024
"""The largest key, certificate chain or DH parameters file read (1 MiB)."""

TLS_EXTRA = (
    "install the tls extra: pip install '.[tls]' in echotw's checkout, "
    "or pip install 'twisted[tls]'"
)
"""
How to get TLS support when pyOpenSSL or service_identity is missing:
echotw is installed from its checkout (no package index has it), and its
tls extra is Twisted's.
"""


def fileKind(mode: int) -> str:
    """
    What a file of this C{st_mode} is, in words, for an error message.
    """
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def checkSmallRegularFile(path: str, maxBytes: int) -> None:
    """
    Check that C{path} is a regular file (or a link to one) of at most
    C{maxBytes}, without opening it.

    @raise ValueError: saying what is wrong with it (the caller names it).
    """
    try:
        status = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(f"not a regular file ({fileKind(status.st_mode)})")
    if status.st_size > maxBytes:
        raise ValueError(
            f"{status.st_size} bytes, more than a key or certificate file holds ({maxBytes} at most)"
        )
