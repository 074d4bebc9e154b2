"""
rproxy: a Twisted-based protocol proxy framework.
"""

__version__ = "0.1.0"
