"""``python -m jaxattn COMMAND ...``: the same as the ``jaxattn`` console script."""

from jaxattn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
