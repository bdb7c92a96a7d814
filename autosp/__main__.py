"""Entry point for ``python -m autosp``."""

from autosp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
