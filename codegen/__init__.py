"""Code generation: jinja2 templates, one family per strategy and backend."""
