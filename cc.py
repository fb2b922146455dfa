#!/usr/bin/env python
"""Command center: python cc.py --config cc.conf [--key=value ...]"""
import sys

from server.cc.app import main

if __name__ == '__main__':
    sys.exit(main())
