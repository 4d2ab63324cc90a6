"""ifguide: influence-guided suppression of toxic training tokens (IF-Guide)."""

__version__ = "0.1.0"
