"""GPT model, training worker, optimizers, compression and checkpoints."""
