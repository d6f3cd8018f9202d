"""The ILVR model on stock transformers: latent tokens, forwards, teacher targets."""
