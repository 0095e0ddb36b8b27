"""Export recipes: Hugging Face model folder -> ONNX -> optimised -> quantised -> validated vs PyTorch.

Runs in a child process (``python -m exporters``) started by ``llmosd.export``: the only place that
imports torch, transformers and optimum. The daemon never imports this package.
"""
