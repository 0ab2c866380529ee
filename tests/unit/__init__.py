"""
Unit tests: one piece of echotw at a time on fakes (StringTransport, MemoryReactor, task.Clock); no network, no process.
"""
