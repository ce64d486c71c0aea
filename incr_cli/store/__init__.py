"""store: the workspace on disk: durable files, the lock, the layout, LATEST, history, lineage,
verification and disk-space checks. No torch."""
