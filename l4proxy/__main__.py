"""``python -m l4proxy`` is the ``l4proxy`` command."""

from .cli import main

main()
