"""Installs megatron_ts: the library, the training entry point and the data tools."""

from setuptools import find_packages, setup

# Ranges for installing into your own environment; scripts/install.sh installs the exact tested
# versions from requirements/lock.txt instead (docs/install.md). Upper bounds stop below the first
# minor release nobody here has tested for the fast-moving dependencies; raise one together with
# the lock (scripts/lock.sh), never alone. megatron-core: one minor series that works on Python
# 3.11 and 3.12 (0.17+ needs 3.12). torch >= 2.5 for SDPA's enable_gqa; the 2.13 CPU wheel
# satisfies the range, so pip never swaps a working torch for a CUDA build.
INSTALL_REQUIRES = [
    "torch>=2.5,<2.14",
    "megatron-core>=0.16.1,<0.17",
    "deepspeed>=0.16,<0.20",
    "webdataset>=0.2.100,<1.1",
    "tensorboard>=2.16",
    "boto3>=1.34",
    "safetensors>=0.4",
    "transformers>=4.45,<5.25",
    "tokenizers>=0.19,<0.24",
    "pillow>=10,<14",
    "numpy>=1.26,<2.5",
]

EXTRAS = {
    # flash-attn compiles CUDA for hours from source; it is optional and SDPA is the default.
    "gpu": ["flash-attn>=2.5"],
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.5",
        "ruff>=0.6",
        "moto[server]>=5.0",
    ],
}

setup(
    name="megatron_ts",
    version="0.1.0",
    description="Token-Shuffle autoregressive text-to-image training at cluster scale",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_ts*", "pretrain*", "data_tools*"]),
    package_data={"pretrain": ["configs/*.toml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "ts-train=pretrain.train:main",
            "ts-data=data_tools.cli:main",
            "ts-convert=megatron_ts.convert.cli:main",
            "ts-generate=megatron_ts.sampling.cli:main",
            "ts-eval=megatron_ts.evaluation.cli:main",
        ]
    },
)
