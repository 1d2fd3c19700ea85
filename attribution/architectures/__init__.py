"""Network definitions that torchvision does not ship (module names match their published checkpoints)."""
