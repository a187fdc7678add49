"""What only a laptop runs: the embedded broker/Redis/MLflow launcher, process spawning, simulated users
and the demo (the `bench` extra). No deployed process imports this package."""
