"""`python -m kdlab` is the `kdlab` command."""

from kdlab.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
