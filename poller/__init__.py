"""Email each user whose points reach a threshold, once."""

import logging

__version__ = "0.1.0"

# Library code never configures logging: the CLI does.
logging.getLogger(__name__).addHandler(logging.NullHandler())
