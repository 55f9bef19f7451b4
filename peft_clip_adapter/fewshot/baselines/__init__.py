"""Few-shot baselines beside CLIP-Adapter, each with one hyperparameter protocol that never reads the test set.

``zero_shot``, ``linear_probe`` and ``tip_adapter`` work on cached features; ``clip_adapter`` trains the
trainer's adapter in process; ``lora`` trains peft's LoRA end to end on the images; ``methods`` runs any of
them on one sampled training set.
"""
