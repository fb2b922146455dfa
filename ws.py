#!/usr/bin/env python
"""Workserver: python ws.py --config ws.conf [--key=value ...]"""
import sys

from server.ws.app import main

if __name__ == '__main__':
    sys.exit(main())
