"""The client agent: a master over worker processes that produce exact per-second load."""
