"""Labels: the labelling rules (stream), the label store (stream writes, training reads) and the
per-query feedback training aggregates from it."""
