"""
End-to-end tests: each starts real processes (twistd -n echo, echotw-probe, the tools CI checks with) and talks to them over loopback.
"""
