"""paramtool: inspect, reinitialize, tie-check and edit PyTorch checkpoint parameters."""

__version__ = "0.1.0"
