"""
What the tests share: fakes, the helpers that start and talk to processes, hypothesis settings and strategies, hostile and WebSocket clients.
"""
