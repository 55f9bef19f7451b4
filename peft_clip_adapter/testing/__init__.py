"""The offline testbed: tiny dual encoders, generated scenes and tasks, and a micro-CLIP pretrained on them."""
