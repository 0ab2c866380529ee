"""
The HTTP listeners: the guarded channel every request passes, health endpoints and Prometheus metrics.
"""
