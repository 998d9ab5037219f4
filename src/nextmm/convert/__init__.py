"""State-dict adapters, one module per source format, and export back to those formats."""
