"""Scorers: how well each image follows its prompt, one number per image.

Every scorer has one interface, ``score(images, prompts, descriptions=None) -> np.ndarray``
(one float per image), and lives in the plain-dict registry :data:`SCORERS`:

- ``clip``: CLIP score with open_clip, ``100 * max(cos(image, text), 0)``. ``model`` is an
  open_clip model name with a ``pretrained`` tag or weights file (``"ViT-L-14"``,
  ``"openai"``), an open_clip folder (``open_clip_config.json`` + weights, or
  ``"local-dir:/path"``), a transformers CLIP folder (converted once into an open_clip folder,
  see :func:`openclip_from_transformers`), or ``"toy"`` (the toy world's tiny CLIP).
- ``torchmetrics``: ``torchmetrics.multimodal.CLIPScore`` over a transformers CLIP folder or
  hub id, the implementation most diffusion papers report (same 0-100 scale).
- ``toy_truth``: the toy world's ground-truth checker (needs each prompt's structured
  description: given, or looked up in the toy prompt set).

Weights are never fetched silently on an offline machine: a real scorer whose weights are
neither local nor cached fails when it is created, naming the model and how to provide it.

Example::

    scorer = get_scorer("clip", model="toy")
    scorer.score(images, ["two red circles"] * len(images))      # -> array([31.2, ...])
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Optional, Sequence

import numpy as np

from segmoe_lab.judge.clip_weights import (  # noqa: F401  ScorerError is part of this module's API
    ScorerError,
    _clip_for_torchmetrics,
    _device,
    _processor_for_torchmetrics,
    _transformers_clip_folder,
    resolve_openclip,
)


class Scorer(ABC):
    """One way to score images against prompts; ``score`` returns one float per image."""

    name: str = ""

    @abstractmethod
    def score(self, images: Sequence, prompts: Sequence[str], descriptions: Optional[Sequence] = None) -> np.ndarray:
        """Score ``images[i]`` against ``prompts[i]`` (``descriptions[i]`` where the scorer needs one)."""

    def __call__(self, images, prompts, descriptions=None) -> np.ndarray:
        return self.score(images, prompts, descriptions)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def describe(self) -> str:
        """What this scorer measures with, for tables and reports."""
        return self.name


def _check_lengths(images, prompts, descriptions=None) -> None:
    if len(images) != len(prompts) or (descriptions is not None and len(descriptions) != len(images)):
        n_desc = "" if descriptions is None else f", {len(descriptions)} descriptions"
        raise ValueError(f"score() needs one prompt per image; got {len(images)} images, {len(prompts)} prompts{n_desc}")


# --- open_clip ----------------------------------------------------------------------------------


class OpenClipScorer(Scorer):
    """CLIP score, ``100 * max(cos(image, text), 0)``, computed with open_clip.

    Args:
        model (`str`, *optional*, defaults to ``"ViT-L-14"``): an open_clip model name, an open_clip
            folder / ``local-dir:`` / ``hf-hub:`` id, a transformers CLIP folder, or ``"toy"``.
        pretrained (`str`, *optional*, defaults to ``"openai"``): a tag of ``model`` or a weights
            file (ignored for folders). OpenAI weights given as a file want ``model="ViT-L-14-quickgelu"``.
        device (`str`, *optional*): defaults to ``"cuda"`` when present.
        batch_size (`int`, *optional*, defaults to 32): images per forward pass.
        clamp (`bool`, *optional*, defaults to `True`): clip negative cosines at 0, as CLIPScore does.
        cache_dir (`str`, *optional*): open_clip's download cache.
    """

    name = "clip"

    def __init__(self, model: str = "ViT-L-14", pretrained: Optional[str] = "openai", device: Optional[str] = None,
                 batch_size: int = 32, clamp: bool = True, cache_dir: Optional[str] = None):
        import open_clip

        self.model_name, self.pretrained = resolve_openclip(model, pretrained, cache_dir)
        self.device, self.batch_size, self.clamp = _device(device), batch_size, clamp
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            self.model_name, pretrained=self.pretrained, device=self.device, cache_dir=cache_dir)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.model_name, cache_dir=cache_dir)
        self._text: dict[str, "np.ndarray"] = {}

    def describe(self) -> str:
        return f"open_clip {self.model_name}" + (f" ({self.pretrained})" if self.pretrained else "")

    def _text_features(self, prompts: Sequence[str]):
        import torch

        new = sorted(set(prompts) - set(self._text))
        with torch.inference_mode():
            for start in range(0, len(new), self.batch_size):
                chunk = new[start:start + self.batch_size]
                f = self.model.encode_text(self.tokenizer(chunk).to(self.device), normalize=True)  # (B, D)
                self._text.update(zip(chunk, f.float().cpu()))
        return torch.stack([self._text[p] for p in prompts])  # (N, D)

    def image_features(self, images: Sequence):
        """Normalised image embeddings, (N, D) on CPU."""
        import torch

        feats = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:start + self.batch_size]])
                feats.append(self.model.encode_image(x.to(self.device), normalize=True).float().cpu())  # (B, D)
        return torch.cat(feats)

    def score(self, images, prompts, descriptions=None) -> np.ndarray:
        _check_lengths(images, prompts, descriptions)
        if not len(images):
            return np.zeros(0)
        cos = (self.image_features(images) * self._text_features(list(prompts))).sum(-1).numpy()  # (N,)
        return 100.0 * (np.maximum(cos, 0.0) if self.clamp else cos).astype(np.float64)


# --- torchmetrics ---------------------------------------------------------------------------------


class TorchmetricsScorer(Scorer):
    """CLIP score as ``torchmetrics.multimodal.CLIPScore`` computes it: ``100 * max(cos, 0)``.

    Args:
        model (`str`, *optional*, defaults to ``"openai/clip-vit-large-patch14"``): a transformers
            CLIP folder, a hub id (from the Hugging Face cache, or downloaded when online) or ``"toy"``.
        device (`str`, *optional*): defaults to ``"cuda"`` when present.
        cache_dir (`str`, *optional*): the Hugging Face cache to look in.
    """

    name = "torchmetrics"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", device: Optional[str] = None,
                 cache_dir: Optional[str] = None):
        from torchmetrics.multimodal import CLIPScore

        folder = _transformers_clip_folder(model, cache_dir)
        self.model_name, self.device = str(folder), _device(device)
        # torchmetrics accepts only a few hub ids by name; a callable is its documented way to pass any CLIP
        self.metric = CLIPScore(model_name_or_path=lambda: (_clip_for_torchmetrics(folder), _processor_for_torchmetrics(folder)))
        self.metric.to(self.device)

    def describe(self) -> str:
        return f"torchmetrics CLIPScore {self.model_name}"

    def score(self, images, prompts, descriptions=None) -> np.ndarray:
        import torch
        from torchvision.transforms.functional import pil_to_tensor

        _check_lengths(images, prompts, descriptions)
        out = []
        with torch.inference_mode():
            for image, prompt in zip(images, prompts):
                x = pil_to_tensor(image.convert("RGB")).to(self.device)  # (3, H, W) uint8
                out.append(float(self.metric(x, prompt)))  # one image: CLIPScore of that pair
        self.metric.reset()
        return np.asarray(out, dtype=np.float64)


# --- toy world ground truth -------------------------------------------------------------------------

class ToyTruthScorer(Scorer):
    """The toy world's ground truth: ``toy.check(image, description)[key]`` per image.

    Args:
        key (`str`, *optional*, defaults to ``"score"``): which entry of the checker's result to report.
        prompts (`str` or `Path`, *optional*): a prompt set CSV with ``prompt`` and ``description``
            columns to look descriptions up in, when ``score`` is not given them (default: the toy set).
    """

    name = "toy_truth"

    def __init__(self, key: str = "score", prompts=None):
        from segmoe_lab import toy

        self.toy, self.key, self._prompts = toy, key, prompts
        self._lookup: Optional[dict] = None

    def describe(self) -> str:
        return f"toy world ground truth ({self.key})"

    def _descriptions(self, prompts: Sequence[str]) -> list:
        if self._lookup is None:
            from segmoe_lab.judge.prompts import load_prompts

            table = load_prompts(self._prompts or "toy")
            if "description" not in table:
                raise ValueError(f"prompt set {self._prompts or 'toy'} has no description column; toy_truth needs one")
            self._lookup = dict(zip(table.prompt, table.description))
        missing = sorted(set(prompts) - set(self._lookup))
        if missing:
            raise ValueError(f"toy_truth: no description for prompts {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                             "pass descriptions= or use prompts from the toy prompt set")
        return [self._lookup[p] for p in prompts]

    def score(self, images, prompts, descriptions=None) -> np.ndarray:
        _check_lengths(images, prompts, descriptions)
        descriptions = self._descriptions(prompts) if descriptions is None else descriptions
        out = []
        for image, desc in zip(images, descriptions):
            result = self.toy.check(image, desc)
            if self.key not in result:
                raise ValueError(f"toy_truth: key={self.key!r} is not in the checker's result; choose one of {sorted(result)}")
            out.append(float(result[self.key]))
        return np.asarray(out, dtype=np.float64)


# --- registry ---------------------------------------------------------------------------------------

SCORERS: dict[str, type[Scorer]] = {"clip": OpenClipScorer, "torchmetrics": TorchmetricsScorer, "toy_truth": ToyTruthScorer}


def get_scorer(name: str, **options) -> Scorer:
    """The scorer ``name`` of :data:`SCORERS`, created with ``options`` (e.g. ``model="toy"``)."""
    if name not in SCORERS:
        raise ValueError(f"scorer {name!r} is not known; choose one of {sorted(SCORERS)}")
    cls = SCORERS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"scorer {name!r}: unknown option(s) {unknown}; valid options: {accepted}")
    return cls(**options)
