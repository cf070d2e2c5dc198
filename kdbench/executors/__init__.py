"""Executors: how a suite's runs are carried out.

* :mod:`.phases`: the store side every executor shares (teachers first, claims, records,
  the session's outcome).
* :mod:`.local`: one run after another in this process (``--executor local``).
* :mod:`.ray_cluster`: the runs as Ray tasks on a local or remote cluster (``--executor ray``).

Executors are plugins: each module registers its executor through the
``kdbench_executors`` hook by an entry point, as a third-party executor would.
"""
