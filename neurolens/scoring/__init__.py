"""Scores of units against per-image labels: AUC, Mann-Whitney p, BH q, correlation, and the flag rule."""
