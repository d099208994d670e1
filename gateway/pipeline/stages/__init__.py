"""The stages of a paid request, one module each; ``gateway.pipeline.pipeline`` composes them."""
