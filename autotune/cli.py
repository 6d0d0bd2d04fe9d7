"""`mixerc autotune` and `mixerc cache` (registered by mixerc/cli.py)."""

COMMANDS: list = []  # click commands added to the `mixerc` group
