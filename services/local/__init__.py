"""What only a laptop or a benchmark runs: the embedded broker/Redis/MLflow launcher, process
spawning, simulated users, the demo and the benchmarks. No deployed process imports this package."""
