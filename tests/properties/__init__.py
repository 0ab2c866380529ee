"""
Property tests: hypothesis, derandomized, of the parsers and data structures.
"""
