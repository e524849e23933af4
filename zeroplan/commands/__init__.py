"""The commands: click parsing and rich rendering. They call the core, the launcher and the
watcher; nothing calls them. ``zeroplan.commands.cli:main`` is the ``zeroplan`` program."""
