"""
Run xinetd's built-in stream echo service on 127.0.0.1:PORT in the foreground,
with a private configuration written to DIR.

Usage: xinetd_echo.py PORT DIR

xinetd forks a child per connection; the limits are lifted (instances, cps)
so that the benchmark measures forking, not xinetd's rate limiting.
"""

import os
import sys
from pathlib import Path

CONFIG = """\
defaults
{{
    instances      = UNLIMITED
    per_source     = UNLIMITED
    cps            = 1000000 1
    log_type       = FILE {dir}/xinetd.log
    log_on_success =
    log_on_failure =
}}
service echo
{{
    type        = INTERNAL UNLISTED
    id          = echo-stream
    socket_type = stream
    protocol    = tcp
    wait        = no
    user        = root
    bind        = 127.0.0.1
    port        = {port}
    flags       = REUSE
}}
"""


def main(port: int, directory: Path) -> None:
    """Write the config, then become xinetd (so the harness's signals reach it)."""
    conf = directory / "xinetd.conf"
    conf.write_text(CONFIG.format(dir=directory, port=port))
    pidfile = str(directory / "xinetd.pid")
    os.execvp("xinetd", ["xinetd", "-dontfork", "-f", str(conf), "-pidfile", pidfile])


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
