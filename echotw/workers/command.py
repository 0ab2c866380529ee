# -*- test-case-name: tests.unit.test_workerpath -*-
"""
The command that starts a worker process of C{--workers N}, built so that
the worker imports nothing from the directory the server was started in:
C{python -I -c BOOTSTRAP} with the supervisor's module path less the
current directory (L{workerPath}).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import echotw
from echotw.workers.contract import WORKER_MAIN, WORKER_PATH

BOOTSTRAP = (
    "import json, os, site, sys; "
    f"sys.path[:] = json.loads(os.environ.pop({WORKER_PATH!r})); "
    "user = site.getusersitepackages(); "
    "user in sys.path and site.addsitedir(user); "
    f"from {WORKER_MAIN} import main; main()"
)
"""
The worker's C{-c} program.

C{python -m echotw.workers.main} would put the current directory first on the
worker's C{sys.path}: a file such as C{ipaddress.py} that another user left
in a shared directory the server was started from would run in every
worker, as the server's user.  So a worker runs C{python -I -c BOOTSTRAP}:
C{-I} (isolated mode, Python 3.4 on, 3.10 included) puts neither the current
directory nor a script's on the path and ignores C{PYTHON*} variables and
the user's site directory, while still running C{site} on the interpreter's
(or the virtualenv's) C{site-packages}, so C{.pth} files, editable installs
among them, still apply.  This program then sets C{sys.path} to the
supervisor's own (L{workerPath}: what C{PYTHONPATH} and the user's site
directory added included, so a worker finds whatever the supervisor found)
less the entries that name the current directory, runs the C{.pth} files of
the user's site directory if the supervisor searched it, as C{site} would
have, and imports L{echotw.workers.main}.
"""

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(echotw.__file__)))
"""The directory the C{echotw} package was imported from."""


def workerPath(path: Sequence[str], cwd: str, packageRoot: str = PACKAGE_ROOT) -> list[str]:
    """
    The worker's C{sys.path}: the supervisor's C{path} without empty or
    relative entries and without C{cwd} (each stands for the current
    directory), duplicates dropped, and with C{packageRoot} (last if it
    was not there).  A directory echotw itself was imported from stays
    searchable, last, even if it is the current one: the supervisor has run
    code from there already.
    """
    here = os.path.realpath(cwd)
    kept: list[str] = []
    for entry in path:
        if not entry or not os.path.isabs(entry) or os.path.realpath(entry) == here:
            continue
        if entry not in kept:
            kept.append(entry)
    if packageRoot not in kept:
        kept.append(packageRoot)
    return kept


def workerCommand(arguments: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """
    The worker's argument vector (C{arguments}, the supervisor's command
    line, after the program) and the environment variables to add for it.
    """
    argv = [sys.executable, "-I", "-c", BOOTSTRAP, *arguments]
    return argv, {WORKER_PATH: json.dumps(workerPath(sys.path, os.getcwd()))}
