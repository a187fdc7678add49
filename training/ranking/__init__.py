"""The online ranking path: first stage, reranker and the one `rank` function. Serving and
training both import it; nothing here imports MLflow or a broker."""
