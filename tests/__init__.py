"""Tests of runstate and its worker runtime (a package, so worker subprocesses can import
``tests.agents``)."""
