"""``python -m nvcache``: the same commands as the ``nvcache`` console script."""

from .cli import main

if __name__ == "__main__":
    main()
