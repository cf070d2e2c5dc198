"""kdbench's built-in plugins. Each module is registered through its own entry point in
pyproject.toml, exactly as a third-party package's plugin would be."""
