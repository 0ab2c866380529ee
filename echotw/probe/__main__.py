"""
C{python -m echotw.probe HOST PORT}, the same as C{echotw-probe}.
"""

from echotw.probe import main

main()
