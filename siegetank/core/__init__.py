"""Reference cores: the protocol loop (loop.py) and two engines, synthetic
(tests, benchmarks) and openmm (real molecular dynamics).

    python -m siegetank.core --cc 127.0.0.1:8980 --ca certs/ca.pem \\
        --engine openmm
"""
from siegetank.core.loop import (Backoff, Core, Fatal, Heartbeats,  # noqa
                                 Permanent, Transient)


def make_engine(name, **settings):
    """The engine `name` ('synthetic' or 'openmm'); OpenMM is imported only
    for the openmm engine."""
    if name == 'synthetic':
        from siegetank.core import synthetic
        return synthetic.Engine(**{k: v for k, v in settings.items()
                                   if k in ('frame_bytes', 'rate')})
    if name == 'openmm':
        from siegetank.core import openmm_engine
        return openmm_engine.Engine(**{k: v for k, v in settings.items()
                                       if k in ('platform', 'threads')})
    raise ValueError('unknown engine %r (synthetic or openmm)' % name)
