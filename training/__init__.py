"""Models, datasets, metrics and the MLflow registry. May import `schemas`, never `services`."""
