"""Build: a source to a verified, cached model folder, stage by stage (prepare -> plan -> build -> verify -> store)."""
