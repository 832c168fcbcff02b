"""Trace readers and writers, replayer, stamps, consistency checker, reports."""
