"""Run functions for the worker tests, importable by worker subprocesses as
``tests.agents.<module>:<function>``."""
