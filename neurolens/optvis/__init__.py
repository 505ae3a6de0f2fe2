"""Feature visualization: objectives, the Fourier parameterization and the optimization loop."""
