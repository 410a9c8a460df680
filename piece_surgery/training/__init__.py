"""The sparse trainer: gradients of selected entries only, the loop, its resumable state."""
