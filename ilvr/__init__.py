"""ILVR-train: model, training and evaluation for interleaved latent visual reasoning."""
