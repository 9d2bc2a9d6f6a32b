"""The PR #1579 crawler transformer and everything around it: config, model, data, training,
quantisation, the artifact, evaluation and int6 inference."""
from .config import CrawlerConfig
from .model import CrawlerGPT

__all__ = ["CrawlerConfig", "CrawlerGPT"]
