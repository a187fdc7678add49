"""The running processes (serve, stream, schedule, simulate, demo) and their I/O."""
