"""``python -m zeroplan``: the ``zeroplan`` command."""

from zeroplan.commands.cli import main

if __name__ == "__main__":
    main()
