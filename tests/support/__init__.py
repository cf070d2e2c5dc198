"""Test helpers shared by several test modules (suites, fault-injecting plugins)."""
