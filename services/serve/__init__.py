"""The serving worker process (`rankloop serve`): `worker.py` ranks, takes in events and swaps
models; `app.py` is its HTTP API; `metrics.py` its Prometheus metrics."""
