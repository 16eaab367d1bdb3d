"""Training recipes: one module per job kind, each run inside a Ray Train worker or a plain process."""
