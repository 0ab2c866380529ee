"""
Who may connect: CIDR sets, the allow/deny policy and verifiers, and the rule files re-read on SIGHUP.
"""
