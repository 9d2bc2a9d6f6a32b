"""The PR #1579 crawler transformer and everything around it: config, model, data, training,
quantisation, the artifact, evaluation and int6 inference."""
from kernels import __version__ as __version__  # one version for the whole distribution (re-exported)

from .config import CrawlerConfig
from .model import CrawlerGPT

__all__ = ["CrawlerConfig", "CrawlerGPT"]
