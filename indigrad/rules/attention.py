"""Rules for this layer family (being written)."""
