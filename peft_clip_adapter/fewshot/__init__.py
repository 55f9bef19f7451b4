"""The few-shot toolkit: data, image inputs, frozen features, prompt classifiers, the ratio search and training.

It builds on the method (``peft_clip_adapter``) and never the other way round.
"""
