"""advrec: streaming recommendations that learn online with adversarial training.

This package holds what the stream app and the trainer share (event contract, bundle
format, configuration helpers, data sources). It imports neither faust nor torch.
"""

__version__ = "0.1.0"
