"""A sparse autoencoder on any vectors: its equation and loss (chapter 03), the fast model and its
kernels, and its training (optimiser, checkpoints, inputs, the loop, several layers at once)."""
