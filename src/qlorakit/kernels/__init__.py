"""Memory-lean autograd functions for the training step (pure torch: the same code runs on CPU and CUDA)."""
