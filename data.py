"""Training data (not written yet: the distillation issue).

It will turn folders of captioned videos into precomputed VAE latents, I2V conditions, CLIP features and
umT5 contexts in safetensors shards, and provide a synthetic moving-shapes source for tests and the demo.
"""
