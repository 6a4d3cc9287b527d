"""Test and demo support: packaged real weights and photos, and self-built tiny models."""
