"""degla-scale: DeGLA fine-tuning of CLIP models with DeepSpeed."""
import sys

from setuptools import find_packages, setup

install_requires = [
    "torch>=2.4",
    "torchvision",
    "open_clip_torch>=3.0",
    "deepspeed>=0.16",
    "webdataset>=0.2.90",
    "braceexpand",  # imported directly by the shard lister
    "mosaicml-streaming>=0.11",
    "hydra-core>=1.3",
    "omegaconf>=2.3",
    "nvidia-ml-py",
    "tensorboard",
    "matplotlib",
    "tqdm",
    "pillow",
    "numpy",
    "safetensors",  # launch/export.py writes, open_clip reads
    "huggingface_hub",  # imported directly: models checks the weight cache before trying a download
    "openai>=1.40",  # make_negatives: the client for OpenAI-compatible chat endpoints (vLLM, llama.cpp, hosted)
]
if sys.platform.startswith("linux"):
    install_requires.append("triton")

setup(
    name="degla-scale",
    version="0.1.0",
    description="DeepSpeed trainer that fine-tunes CLIP models with DeGLA (decoupled global-local alignment)",
    python_requires=">=3.10",
    packages=find_packages(include=["degla_scale", "degla_scale.*", "kernels", "kernels.*"]),
    package_data={"degla_scale": ["model_configs/*.json"]},
    install_requires=install_requires,
    extras_require={"dev": ["pytest>=8"]},
)
