"""The embedded DNS resolver on 127.0.0.11:53 in every task sandbox (issue 6).

``records`` is the pure name table and Docker's lookup rules; ``server`` serves it on
sockets opened inside each sandbox's network namespace and forwards other names to the
host's resolvers.
"""
