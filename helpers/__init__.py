"""Sparse autoencoders on InceptionV1's mixed4a-4e: harvest, train, analyse.

Modules, bottom to top: ``sae`` (a TopK SAE on any vectors), ``inception`` and ``images``;
``store``, ``harvest`` and ``train``; the analyses and figures above them; ``cli`` on top.
"""

__version__ = "0.1.0"
