"""Image inputs: decoding, the views' transforms, their resampling on the accelerator, and the extraction loader."""
