"""``python -m nvcache``: the same commands as the ``nvcache`` console script."""

from .console import main

if __name__ == "__main__":
    main()
