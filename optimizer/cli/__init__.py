"""The ``dlopt`` command: one module per verb group; translates options into calls and exceptions
into exit codes."""
