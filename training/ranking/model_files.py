"""The files of a model folder besides the sentence-transformers save (no heavy imports, so the
registry and admin commands can check a folder without loading torch)."""

META_FILE = "rankloop.json"  # kind, mix (alpha, beta, tau), rerank depth, lineage
PRIOR_FILE = "feedback_prior.json"  # the feedback memory served: query -> {doc_id: evidence}, every label's
MEASURED_PRIOR_FILE = "feedback_prior.measured.json"  # the one tuning and the gate measured it with (train slice)
MEMORY_FILE = "memory_queries.npy"  # the memory's queries embedded by the version, in PRIOR_FILE's order
