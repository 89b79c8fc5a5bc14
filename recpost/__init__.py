"""recpost: post-training generative recommenders with PyTorch Lightning.

Layers import downward only: ``data`` -> ``models`` -> ``evaluation`` -> ``methods`` -> ``cli``.
``load_pretrained`` (an exported model folder, ready to recommend) is imported on first use, so that
``import recpost`` stays light and pulls no layer in.
"""

from recpost.core.errors import RecpostError

__all__ = ["RecpostError", "load_pretrained"]
__version__ = "0.1.0"  # the one version string: pyproject.toml reads it, `recpost --version` prints it


def __getattr__(name: str):
    if name == "load_pretrained":
        from recpost.serving.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'recpost' has no attribute {name!r}")
