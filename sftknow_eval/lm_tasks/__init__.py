"""Closed-book QA per mastery bucket as lm-eval tasks: writing task families, scoring them,
and reading lm-eval's results back into the paper's table."""
