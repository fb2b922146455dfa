"""`python -m siegetank` is the `siegetank` command."""
import sys

from siegetank.cli import main

sys.exit(main())
