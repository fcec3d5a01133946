"""Model loading, per-family adapters and the one surgery module."""
