"""
How echo connections are accepted and served fast: echotw's reactor, its TCP port and transport, and the direct-send fast path.
"""
