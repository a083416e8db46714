"""Benchmarks for poller: data generator, SMTP sink, reference programs and the runner."""
