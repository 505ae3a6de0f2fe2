"""The toy CLIP: a generated image-caption dataset with a planted concept, and a small CLIP trained on it."""
