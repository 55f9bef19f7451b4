"""Evaluation protocols beyond few-shot: base-to-novel, cross-domain, and CoOp's split files."""
