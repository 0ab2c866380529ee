"""
--workers N: the supervisor that binds the listeners and keeps worker processes running, and the worker process's side.
"""
