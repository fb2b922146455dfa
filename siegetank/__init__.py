"""Siegetank client side: the manager client (siegetank.client, whose
2014-style module functions are re-exported here), the `siegetank` command
line (siegetank.cli) and the reference cores (siegetank.core)."""
from siegetank.client import (
                              Client,
                              SiegetankError,
                              Stream,
                              Target,
                              add_target,
                              generate_token,
                              get_targets,
                              load_stream,
                              load_target,
                              login,
                              workserver_status,
)

__all__ = ['Client', 'SiegetankError', 'Stream', 'Target', 'add_target',
           'generate_token', 'get_targets', 'load_stream', 'load_target',
           'login', 'workserver_status']
