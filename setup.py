from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
for line in (ROOT / "rtdmd_kernels" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        version["v"] = line.split("=")[1].strip().strip('"')

setup(
    name="rtdmd",
    version=version["v"],
    description="Fast, exact kernels and a compact trainer for Reward-Tilted Distribution Matching Distillation",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rtdmd_kernels", "rtdmd_kernels.*", "rtdmd", "rtdmd.*"]),
    package_data={"rtdmd": ["configs/*.yaml"]},
    include_package_data=True,
    # the kernels need torch alone; the trainer and sampler need the "train" extra (rtdmd/_deps.py checks it)
    install_requires=[
        "torch>=2.4",  # never pinned to a CUDA or CPU build: users bring the build they need
    ],
    extras_require={
        "train": [
            "numpy",
            "safetensors",
            "diffusers>=0.42",  # Flux2KleinPipeline, LoRA adapter metadata
            "transformers",
            "peft>=0.17",
            "pyyaml",
            "tqdm",
            "matplotlib",
            "pillow",
            "scipy",  # Mask2Former (the geneval reward) builds its training loss with scipy
        ],
        "triton": ["triton>=3.6"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "psutil", "ruff", "tensorboard"],  # tensorboard: log.tensorboard
        "xformers": ["xformers"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
