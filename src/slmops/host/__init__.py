"""The machine slmops runs on, used within bounds: safe file writes and bounded reads, the CPUs it may use, the instruction sets a folder needs."""
