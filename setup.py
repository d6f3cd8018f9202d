"""ILVR-train: interleaved latent visual reasoning on DeepSpeed ZeRO-3."""
from setuptools import find_packages, setup

setup(
    name="ilvr-train",
    version="0.1.0",
    description="Train multimodal LLMs to reason with interleaved latent visual tokens (ILVR)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ilvr", "ilvr.*", "data_pipeline", "data_pipeline.*"]),
    # Ranges for cluster users, capped only where a newer release is known to break (docs/install.md). The CPU
    # quick start and CI install the exact tested set instead: scripts/setup.sh + scripts/constraints-cpu.txt.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        # 5.25 (kernels decorators on attention classes) works since models are built through
        # ilvr.model.build.zero3_init; no known upper bound
        "transformers>=4.50",
        "webdataset>=0.2.86",
        "sentencepiece",
        "tokenizers",
        "mlflow>=2.10",
        "pyyaml",
        "pillow",
        "tqdm",
        "safetensors",
        "accelerate>=1.1",  # transformers' DeepSpeed integration (ZeRO-3 loading) needs it
        # FrozenLake sprites that draw the VSP images (data_pipeline/vsp_world.py): byte-identical in
        # 0.29.1-1.3.0; 1.4 removed ice/hole/goal/cracked_hole
        "gymnasium>=0.29.1,<1.4",
        # LoRA (model.lora.*): trainable_token_indices for the latent token rows, add_adapter for the teacher;
        # tested with 0.21.2
        "peft>=0.17",
    ],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        # stock AutoProcessor for Qwen2-VL / 2.5-VL needs torchvision (its video processor). Not a hard
        # requirement: PyPI's torchvision does not import beside the CPU quick start's pinned torch, and
        # without it data_pipeline.tiny_processor.load_processor reads the same files.
        "vision": ["torchvision"],
        "cluster": ["torchvision", "flash-attn>=2.5"],  # a CUDA cluster: vision + FlashAttention-2
        "dev": ["pytest>=7", "pytest-timeout", "pytest-xdist>=3.5"],
    },
    entry_points={
        "console_scripts": [
            "ilvr-prepare=data_pipeline.prepare:main",
            "ilvr-train=ilvr.train:main",
            "ilvr-export=ilvr.export:main",
            "ilvr-eval=ilvr.evaluation.cli:main",
            "ilvr-report=ilvr.evaluation.report:main",
        ],
    },
)
