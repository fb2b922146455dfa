"""Siegetank client side: the manager client and CLI, and the cores."""
