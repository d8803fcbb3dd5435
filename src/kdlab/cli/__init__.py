"""The ``kdlab`` command line (:mod:`kdlab.cli.main`), its commands and their argument parsers.

The top layer: it may import every other layer; nothing in kdlab imports it.
"""
