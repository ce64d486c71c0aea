"""scoring: held-out scoring, its cache, the gate's sample, the eval matrix, continual-learning
summaries, downstream tasks and probes, embeddings, and rendering eval results."""
