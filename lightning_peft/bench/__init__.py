"""Side-by-side measurement of methods (parameters, memory, speed, quality)."""
