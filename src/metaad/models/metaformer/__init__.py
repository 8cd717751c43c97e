"""Metaformer (Wu et al., ICCV 2021): model A (+ P, T), the instance prior P and its GAN training,
saliency baselines, unsupervised meta-tasks and MAML."""
