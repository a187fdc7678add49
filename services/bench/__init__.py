"""The benchmarks (`rankloop bench ...`): each runs the product on its own local stack and writes JSON.
Needs the `bench` extra; no deployed process imports this package."""
