"""llmosd: an edge / on-prem appliance daemon for language models."""

__version__ = "0.1.0"
