"""Every Redis key of the command center, built in one place.

Kept flat and short: one hash per workserver plus a set of their names.
"""

WORKSERVERS = 'workservers'              # set of ws names


def ws(name):
    """hash: url, http_port, online ('1'/'0'), fails (consecutive)."""
    return 'ws:%s' % name
