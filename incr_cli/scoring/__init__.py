"""scoring: held-out scoring, its cache, the gate's sample, the eval matrix, continual-learning
summaries, downstream tasks and probes, embeddings, and rendering eval results.

Why ``probe.py`` imports the device, embedding, cache and model modules inside its functions: `incr
status` reads the recorded task scores through it without torch."""
