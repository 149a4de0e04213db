"""``python -m splitcore``: the command line (``main``) and its sub-commands by concern."""
