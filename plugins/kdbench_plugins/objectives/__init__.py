"""Built-in objectives (:class:`kdbench.api.Objective`): ``classification`` and
``regression``, each registered through its own entry point like any plugin."""
