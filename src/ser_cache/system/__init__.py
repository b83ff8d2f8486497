"""The system every training path composes: heads, pooling, losses, metrics, samplers, the rows it learns from."""
