"""
Integration tests: echotw over real sockets (loopback, socket pairs) in the test's own process and reactor.
"""
