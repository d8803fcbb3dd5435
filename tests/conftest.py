"""Root of the test suite: its folder is on ``sys.path`` (pytest's default ``prepend`` import
mode inserts the folder of a conftest that is not in a package), so every test can import the
shared helpers of :mod:`support`."""
