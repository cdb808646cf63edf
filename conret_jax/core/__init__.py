"""Detection math as pure jnp functions with static shapes: anchors, boxes, matching, targets, losses, NMS."""
