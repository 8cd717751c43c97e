"""Parts several methods share: nearest-neighbour search, coreset, smoothing, SSIM, synthetic anomalies."""
