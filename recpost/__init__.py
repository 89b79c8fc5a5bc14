"""recpost: post-training generative recommenders with PyTorch Lightning.

Layers import downward only: ``data`` -> ``models`` -> ``evaluation`` -> ``methods`` -> ``cli``.
"""

from recpost.errors import RecpostError

__all__ = ["RecpostError"]
__version__ = "0.1.0"
