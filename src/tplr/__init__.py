"""tplr: incentivised, internet-wide LLM pretraining over S3-compatible storage."""

__version__ = "0.1.0"
