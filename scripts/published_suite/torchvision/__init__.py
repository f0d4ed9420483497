"""A stand-in for the few torchvision names the published singd 0.0.5 tests and examples
import (``datasets.MNIST``; ``transforms.ToTensor``, ``Normalize``, ``Compose``).

Put on ``sys.path`` by ``scripts/run_published_tests.py`` only where torchvision itself
is not installed; never part of the project. ``MNIST`` reads the files that script
writes and downloads nothing.
"""

__version__ = "0+standin"
