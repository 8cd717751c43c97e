"""Unsupervised meta-learning for Metaformer (§3.1): meta-tasks from wild images, then MAML."""
