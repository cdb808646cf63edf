"""Training: mesh and shardings, optimizer, state, the jitted step, checkpoints, and the loop."""
