"""preftune: align causal language models to preference data directly (DPO and its family)."""

__version__ = "0.1.0"
