"""CLIP image encoders through ``transformers`` (``CLIPVisionModelWithProjection`` and its
PIL image processor, so neither torchvision nor open_clip is needed).

An encoder is described by a JSON-able spec, written as ``encoder.json`` beside embeddings
so that images can be embedded again the same way at prediction time:

``{"library": "transformers", "class": "CLIPVisionModelWithProjection", "model": NAME,
"pretrained": "weights" | "none", "embedding_dim": D, "image_size": S, "seed": 0,
"config": {...}}``

``pretrained="weights"`` loads ``model`` (a Hugging Face hub name or a local folder) with its
weights; ``"none"`` builds the architecture with random weights drawn from ``seed``, offline:
for the default model from the known ViT-L/14 shape, otherwise from the model's
``config.json`` (a local folder, or a name already in the Hugging Face cache). The embedding
is the projected image embedding (``image_embeds``, what CLIP's ``get_image_features``
returns), not normalised.
"""
from __future__ import annotations

import os

import numpy as np

from locdiff.data.files import DataError
from locdiff.devices import resolve_device
from locdiff.extras import require
from locdiff.images import read_image

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
PRETRAINED = ("weights", "none")
SPEC_FILE = "encoder.json"
# The vision tower of openai/clip-vit-large-patch14 (its config.json), so that
# `--pretrained none` builds it with no download.
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_SPEC_KEYS = ("model", "pretrained", "embedding_dim", "image_size", "seed", "config")


def _offline() -> bool:
    # Read here rather than through huggingface_hub's constants, which freeze at import.
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_unresolvable() -> str | None:
    """The hub's host name when it cannot be resolved (no network), else None: huggingface_hub
    retries such a failure five times over about 25 s before transformers gives up."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return None  # behind a proxy only the proxy need resolve the hub's name
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError):
        return host
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def canonical_model(model: str) -> str:
    """A local model folder as an absolute path (so encoder.json finds it from anywhere);
    a hub name as it is."""
    path = os.path.expanduser(str(model))
    return os.path.abspath(path) if model and os.path.isdir(path) else model


def vision_config(model: str, pretrained: str = "weights"):
    """The ``CLIPVisionConfig`` of ``model``: built in for the default name with
    ``pretrained="none"``, else read from a local folder, the cache or (online) the hub."""
    tf = require("transformers", "the CLIP image encoder")
    if pretrained not in PRETRAINED:
        raise DataError(f"--pretrained {pretrained!r}: expected one of {', '.join(PRETRAINED)}")
    if not model or not str(model).strip():
        raise DataError(f"--model {model!r}: expected a Hugging Face model name such as {DEFAULT_MODEL} "
                        "or a local model folder")
    if model == DEFAULT_MODEL and pretrained == "none":
        return tf.CLIPVisionConfig(**VIT_L14)
    # A hub name is "owner/name"; anything else with a slash is meant as a folder.
    if str(model).startswith(("/", ".", "~")) or str(model).count("/") > 1 or "\\" in str(model):
        if not os.path.isdir(os.path.expanduser(model)):
            raise DataError(f"--model {model!r}: model folder not found (expected a folder with a config.json, "
                            f"or a Hugging Face model name such as {DEFAULT_MODEL})")
        model = os.path.expanduser(model)
    local = pretrained == "none" or _offline() or os.path.isdir(model)
    unresolvable = None if local else _hub_unresolvable()
    try:
        return tf.CLIPVisionConfig.from_pretrained(model, local_files_only=local or unresolvable is not None)
    except Exception as err:  # transformers and huggingface_hub raise many types here
        where = "a local folder or the Hugging Face cache" if local else "a local folder, the cache or the hub"
        offline = "" if local else ("; without a network, set HF_HUB_OFFLINE=1 to read the cache only, give a local "
                                    "model folder, or --pretrained none")
        if unresolvable:
            where = f"a local folder or the Hugging Face cache, and the hub's host {unresolvable} cannot be resolved"
        raise DataError(f"--model {model!r}: cannot load the encoder's configuration from {where} "
                        f"({_one_line(err)}){offline}") from None


def _processor_class(tf):
    # transformers >= 5 names the PIL-only processor CLIPImageProcessorPil (the plain name
    # wants torchvision); earlier versions have only CLIPImageProcessor, which is PIL-based.
    return getattr(tf, "CLIPImageProcessorPil", None) or tf.CLIPImageProcessor


class Encoder:
    """A loaded CLIP image encoder: ``embed(images)`` -> (N, D) float32 numpy."""

    def __init__(self, model, processor, spec: dict, device):
        self.model, self.processor, self.spec, self.device = model.eval(), processor, spec, device

    @property
    def embedding_dim(self) -> int:
        return int(self.spec["embedding_dim"])

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, pretrained: str = "weights", device=None,
             seed: int = 0) -> "Encoder":
        """The encoder ``model`` (see the module docstring for ``pretrained``)."""
        cfg = vision_config(model, pretrained)
        return cls._build(canonical_model(model), pretrained, cfg, device, seed, f"--model {model!r}")

    @classmethod
    def from_spec(cls, spec: dict, device=None, path=SPEC_FILE) -> "Encoder":
        """The encoder an ``encoder.json`` describes (random weights are drawn again from its
        seed, so they match the ones its embeddings were made with); a DataError naming
        ``path``, the key and the value for a description that cannot be one."""
        tf = require("transformers", "the CLIP image encoder")
        missing = [k for k in _SPEC_KEYS if k not in spec]
        if missing or spec.get("library") != "transformers":
            raise DataError(f"{path}: not an encoder description of this version "
                            f"(missing {missing or ['library: transformers']})")
        if spec["pretrained"] not in PRETRAINED:
            raise DataError(f"{path}: pretrained = {spec['pretrained']!r}: expected one of {', '.join(PRETRAINED)}")
        # Upper bounds too: a shared encoder.json could ask for images of any size.
        for key, lo, hi in (("seed", 0, 2**63 - 1), ("embedding_dim", 1, 65536), ("image_size", 1, 4096)):
            v = spec[key]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise DataError(f"{path}: {key} = {v!r}: expected an integer in [{lo}, {hi}]")
        if not isinstance(spec["config"], dict):
            raise DataError(f"{path}: config = {spec['config']!r}: expected the architecture's settings (an object)")
        try:
            cfg = tf.CLIPVisionConfig(**spec["config"])
        except Exception as err:  # noqa: BLE001  (huggingface_hub's validation errors derive from Exception)
            raise DataError(f"{path}: config is not a CLIP vision architecture ({_one_line(err)})") from None
        if int(getattr(cfg, "projection_dim", spec["embedding_dim"])) != spec["embedding_dim"]:
            raise DataError(f"{path}: embedding_dim = {spec['embedding_dim']} but the architecture's projection_dim "
                            f"is {cfg.projection_dim}")
        return cls._build(spec["model"], spec["pretrained"], cfg, device, spec["seed"],
                          f"{path}: model {spec['model']!r}")

    @classmethod
    def _build(cls, model, pretrained, cfg, device, seed, source):
        # source: how errors name the model (the --model flag, or the encoder.json it came from)
        import torch

        tf = require("transformers", "the CLIP image encoder")
        dev = resolve_device(device)
        proc_cls = _processor_class(tf)
        s = int(cfg.image_size)
        if pretrained == "none":
            # A private RNG stream: the same seed gives the same weights, and the caller's
            # global torch RNG is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = tf.CLIPVisionModelWithProjection(cfg)
            proc = proc_cls(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        else:
            local = _offline() or os.path.isdir(os.path.expanduser(model)) or _hub_unresolvable() is not None
            try:
                net = tf.CLIPVisionModelWithProjection.from_pretrained(model, local_files_only=local)
                proc = proc_cls.from_pretrained(model, local_files_only=local)
            except Exception as err:  # transformers and huggingface_hub raise many types here
                raise DataError(f"{source}: cannot load the encoder's weights "
                                f"({_one_line(err)})") from None
            cfg = net.config
        # The width of the weights themselves: a full CLIP checkpoint's vision config can
        # carry a default projection_dim that is not the one its projection has.
        dim = int(net.visual_projection.out_features)
        spec = {"library": "transformers", "class": "CLIPVisionModelWithProjection", "model": model,
                "pretrained": pretrained, "embedding_dim": dim, "image_size": s,
                "seed": int(seed), "config": {**_config_dict(cfg), "projection_dim": dim}}
        return cls(net.to(dev), proc, spec, dev)

    def embed(self, images) -> np.ndarray:
        """(N, D) float32 embeddings of PIL images (one forward pass; batch outside)."""
        import torch

        if not images:
            return np.empty((0, self.embedding_dim), np.float32)
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.model(pixel_values=pixels.to(self.device, torch.float32)).image_embeds
        return out.float().cpu().numpy()

    def iter_files(self, paths, batch_size: int = 32):
        """Embed image files in batches of ``batch_size``: yields (embeddings (n, D) float32,
        kept paths, their EXIF (lat, lon) or None, skipped [(path, reason)]) per batch."""
        from locdiff.images import UnreadableImage

        for i in range(0, len(paths), batch_size):
            images, kept, gps, skipped = [], [], [], []
            for p in paths[i:i + batch_size]:
                try:
                    photo = read_image(p, self.image_size)
                except UnreadableImage as err:
                    skipped.append((p, str(err)))
                    continue
                images.append(photo.image)
                kept.append(p)
                gps.append(photo.latlon)
            yield self.embed(images), kept, gps, skipped


def _config_dict(cfg) -> dict:
    """The architecture fields of a CLIPVisionConfig (not the bookkeeping ones that differ
    between transformers versions)."""
    keys = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
            "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
            "initializer_range", "initializer_factor")
    d = cfg.to_dict()
    return {k: d[k] for k in keys if k in d}


def read_spec(path) -> dict:
    """The encoder description in an ``encoder.json`` file."""
    import json

    try:
        spec = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError, RecursionError) as err:
        raise DataError(f"{path}: not a readable encoder description ({_one_line(err)})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: not an encoder description (a JSON {type(spec).__name__}, not an object)")
    return spec


def spec_path_for_embeddings(embeddings):
    """Where ``locdiff embed`` put the encoder.json of an embeddings folder or ``.npy`` file
    (beside the shards, or beside the file); None when there is none."""
    from pathlib import Path

    p = Path(embeddings)
    candidate = (p if p.is_dir() else p.parent) / SPEC_FILE
    return candidate if candidate.is_file() else None


def record_encoder(embeddings, run_dir) -> bool:
    """Copy the encoder.json of the embeddings a run is trained on into the run folder, so
    that the run can embed images itself; False when the embeddings have none."""
    from pathlib import Path

    from locdiff.data.files import atomic_write_bytes

    src = spec_path_for_embeddings(embeddings)
    if src is None:
        return False
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(run_dir) / SPEC_FILE, src.read_bytes())
    return True
