"""The torch backend: kernel plan -> a module of torch code (any device)."""
