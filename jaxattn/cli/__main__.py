"""``python -m jaxattn.cli``: the same as the ``jaxattn`` console script."""

from jaxattn.cli import main

# Guarded, as a main module should be: a process that multiprocessing starts may import it again.
if __name__ == "__main__":
    raise SystemExit(main())
