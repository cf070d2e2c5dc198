"""kdbench: fair, reproducible benchmarks for knowledge distillation."""

__version__ = "0.1.0"
