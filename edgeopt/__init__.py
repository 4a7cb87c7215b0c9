"""edgeopt: take a trained model to certified, fast, hardware-specific edge artifacts.

The core library: plain Python, no Prefect and no MLflow (``tasks/`` and ``flows/`` wire it).
"""

__version__ = "0.1.0"
