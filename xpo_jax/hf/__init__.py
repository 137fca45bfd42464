"""Hugging Face runs: tokenizers and chat templates, prompt files read through TFDS array_record
(no TensorFlow), and the pieces of a run on HF checkpoints (prompt stream, host judge).

Checkpoint weights in and out live in `xpo_jax.models.hf`; this package is where a real-model
run's prompts and rewards come from.
"""
