"""``python -m shoal``: the same as the ``shoal`` command."""

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
