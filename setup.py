"""Package metadata: installs the import packages `kernels` (Triton ops + references) and `crawler`
(the PR #1579 crawler transformer, its trainer, quantiser, artifact and evaluation)."""
from setuptools import setup

setup(
    name="crawler-kernels",
    version="0.1.0",
    description="Triton kernels and a trainer for Parameter Golf crawler transformers",
    packages=["kernels", "crawler"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "triton>=3.1",
        "sentencepiece>=0.2",
        "brotli>=1.1",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "bench": ["matplotlib>=3.7"],
    },
)
