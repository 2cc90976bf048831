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
CLIP_BENCHMARK = "clip-benchmark==1.6.2"  # the Makefile installs the same pin for the tests

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
    extras_require={
        # ARO's COCO-/Flickr30k-Order perturbations, as its perturbations.py makes them: spaCy tags nouns and
        # adjectives (plus its model: python -m spacy download en_core_web_sm), NLTK tokenises the trigram ones
        # (plus its data: python -m nltk.downloader punkt_tab)
        "aro": ["spacy>=3.7,<4", "nltk>=3.9"],
        # zero-shot prompts and class names for datasets other than ImageNet (read from its packaged JSON files)
        "zeroshot": [CLIP_BENCHMARK],
        # logging.wandb=true
        "wandb": ["wandb>=0.19"],
        "dev": ["pytest>=8", "nltk>=3.9", "wandb>=0.19"],
    },
)
