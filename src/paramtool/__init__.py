"""paramtool: inspect, reinitialize, tie-check and edit PyTorch checkpoint parameters."""

__version__ = "0.1.0"

# The format registry first: each format's module (under formats/) imports the in-memory model (toc, checkpoint),
# whose modules import formats.dtypes; importing the registry before them keeps that order acyclic at run time.
from . import formats  # noqa: E402,F401  (no torch: each format imports its heavy readers when used)
