"""The serving worker's routes, a router per concern: ranking, events, health and metrics."""
