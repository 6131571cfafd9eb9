"""2D natural-image ViT -> 3D ViT encoder (METHODS.md section 3, Cheng et al. 2024).

Sources (:func:`load_vit2d`, the ``source`` string of :func:`encoder_from_2d`):

``"timm:<name>"``   ``timm.create_model(name, pretrained=True)``: weights from the Hugging Face
                    hub. The only path that touches the network, and only when a user names it.
``"file:<path>"``   a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.npz`` checkpoint,
                    loaded with timm's own loaders (``timm.models.load_checkpoint``, which reads the
                    big_vision / augreg ``.npz`` layout through ``VisionTransformer.load_pretrained``).
                    The architecture comes from a sidecar ``<path minus suffix>.json``
                    (``{"model_name": ..., "model_args": {...}}``, written by
                    :mod:`neuroray.models.pretrain2d`) when present, otherwise it is read off the
                    tensors (width, patch, depth, MLP ratio, class / register tokens, grid); the
                    head count cannot be read from torch tensors and defaults to width // 64 (every
                    timm ViT size uses 64-wide heads); pass ``num_heads=`` otherwise.

What the transfer does (:func:`transfer_vit2d`), key by key, all recorded in a
:class:`TransferReport`:

- ``blocks.*`` and ``norm.*`` are **copied** unchanged: a transformer block does not know the
  dimensionality of the tokens' origin. Width, depth, heads, MLP ratio and qkv bias follow the 2D
  model. Layer scale (``ls1`` / ``ls2`` gammas, e.g. DeiT-III, DINOv2) is **folded** exactly into
  the preceding ``attn.proj`` / ``mlp.fc2`` (``g * (W x + b) = (g W) x + g b``).
- ``patch_embed.proj.weight`` is **inflated** from Conv2d(3, C, py, px) to Conv3d(1, C, D, py, px):
  RGB -> 1 channel by **summing** the three input-channel kernels, so a grey volume gets exactly
  the response the 2D model gives the same grey image replicated into R, G, B (averaging would
  scale every response by 1/3 and break that identity). Then ``"center"`` puts the summed kernel
  in the middle depth slice ``D // 2`` and zeros elsewhere (the paper's best), ``"average"``
  puts kernel / D in every depth slice. Both give a volume that is constant along z the 2D
  embedding of its slice. A 2D patch other than (py, px) is resized first with timm's FlexiViT
  ``resample_patch_embed``. ``patch_embed.proj.bias`` is copied.
- ``pos_embed``: the 2D grid embedding (class position removed) is **interpolated** (bilinear,
  :func:`neuroray.models.vit3d.resize_pos_embed`) to the 3D token grid's (Ny, Nx) and shared across
  depth (``pos_embed="yx_depth"``); ``depth_embed`` is **new**, learned and zero-initialised, so
  at initialisation every z slice of tokens starts exactly as the 2D model's tokens.
- Class token: kept by default (``keep_cls_token=True``) because every 2D block was trained with
  it in the sequence; its position embedding (the 2D ``pos_embed[:, 0]``) is **folded** into
  ``cls_token`` since ViT3D gives the class token no position. UNETR and MAE read patch tokens
  only, so the class token is context, never an output. ``keep_cls_token=False`` drops it.
- Register tokens, ``fc_norm`` and classifier heads have no place in ViT3D and are **dropped**
  (listed by their 2D key).
- Optional ``fold_normalization=True`` also folds the 2D model's per-channel input normalisation
  ``(x - mean_c) / std_c`` into the inflated weights and bias, so a [0, 1] grey volume gets the
  response the 2D model gives the normalised grey image (the default keeps the paper's plain
  sum; fine-tuning data arrive in [0, 1]).

Models outside this recipe (rotary position embeddings, qk-norm, pre-norm, parallel or post-norm
blocks, non-GELU MLPs) raise :class:`~neuroray.models.vit3d.ModelError` naming what is unsupported.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from neuroray.models.vit3d import ModelError, ViT3D, ViTConfig, build_vit3d, resize_pos_embed
from neuroray.registry import Registry

Inflate = Literal["center", "average"]
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")

# ----------------------------------------------------------------------------------------------
# patch-embedding inflation: [C, Y, X] grey 2D kernel -> [C, 1, D, Y, X]

INFLATIONS: Registry = Registry("inflation")


@INFLATIONS.register("center")
def inflate_center(kernel: Tensor, depth: int) -> Tensor:
    """The 2D kernel in depth slice ``depth // 2``, zeros in the others (z-constant input: same)."""
    out = kernel.new_zeros(kernel.shape[0], 1, depth, *kernel.shape[1:])
    out[:, 0, depth // 2] = kernel
    return out


@INFLATIONS.register("average")
def inflate_average(kernel: Tensor, depth: int) -> Tensor:
    """The 2D kernel divided by ``depth`` in every slice (z-constant input: same response)."""
    return (kernel / depth)[:, None, None].expand(-1, 1, depth, -1, -1).clone()


# ----------------------------------------------------------------------------------------------
# report


@dataclass
class TransferReport:
    """What :func:`transfer_vit2d` did. 3D encoder keys in the first five lists, 2D keys in
    ``dropped``; every 3D state-dict key is in exactly one of copied / inflated / interpolated /
    folded / new."""

    source: str
    inflate: str
    config: ViTConfig
    copied: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        width, depth, heads = self.config.dims()
        lines = [
            f"2D->3D transfer from {self.source} ({self.inflate} inflation): width {width}, "
            f"depth {depth}, heads {heads}, patch {self.config.patch_size}, crop "
            f"{self.config.img_size}",
            f"  copied {len(self.copied)} tensors (blocks, norms, patch bias)",
            f"  inflated {self.inflated or 'none'}; interpolated {self.interpolated or 'none'}",
            f"  folded {_compact(self.folded)}; new (initialised here) {self.new or 'none'}",
            f"  dropped from the 2D model {_compact(self.dropped)}",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _compact(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit})" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------
# loading 2D ViTs


@dataclass
class Vit2D:
    """A loaded 2D timm ViT plus where it came from and its input normalisation."""

    model: VisionTransformer
    source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    notes: list[str] = field(default_factory=list)


def sidecar_path(checkpoint: str | Path) -> Path:
    """Where the architecture JSON of a checkpoint lives: same name, ``.json`` suffix."""
    return Path(checkpoint).with_suffix(".json")


def load_vit2d(source: str, *, num_heads: int | None = None) -> Vit2D:
    """A 2D timm VisionTransformer from ``"timm:<name>"`` or ``"file:<path>"`` (or a bare path)."""
    kind, _, rest = source.partition(":")
    if kind == "timm" and rest:
        return _load_from_hub(rest)
    path = Path(rest if kind == "file" else source).expanduser()
    if kind not in ("file", "timm") and not path.exists():
        raise ModelError(
            f"2D source {source!r} is neither 'timm:<model name>' nor 'file:<checkpoint path>' "
            "nor an existing checkpoint file"
        )
    return _load_from_file(path, num_heads)


def _load_from_hub(name: str) -> Vit2D:
    import timm

    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # noqa: BLE001 - unknown name, no network, missing weights
        raise ModelError(
            f"could not create timm model {name!r} with pretrained weights ({type(err).__name__}: "
            f"{err}); check the name with timm.list_pretrained(), or, offline, pretrain one with "
            "`neuroray models pretrain-2d` and use source 'file:<path>.safetensors'"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"timm model {name!r} is a {type(model).__name__}, not a VisionTransformer; "
            "choose a plain ViT (e.g. vit_small_patch16_224.dino, vit_base_patch16_224.augreg_in21k)"
        )
    return Vit2D(model.eval(), f"timm:{name}", *_normalisation(model))


def _normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a timm model's pretrained config names; timm's ViT default 0.5 / 0.5."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))


def _load_from_file(path: Path, num_heads: int | None) -> Vit2D:
    from timm.models import load_checkpoint

    if not path.is_file():
        raise ModelError(f"2D checkpoint {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelError(
            f"2D checkpoint {str(path)!r} has suffix {suffix!r}; use one of {CHECKPOINT_SUFFIXES}"
        )
    notes: list[str] = []
    meta: dict[str, Any] = {}
    state = None if suffix == ".npz" else read_state_dict(path)
    side = sidecar_path(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except ValueError as err:
            raise ModelError(f"{side} is not valid JSON ({err}); fix or delete it") from None
        args = dict(meta.get("model_args", {}))
        notes.append(
            f"architecture from {side.name}: {meta.get('model_name', 'VisionTransformer')}"
        )
    elif state is None:
        args = _vit_args_from_npz(path)
        notes.append("architecture read from the .npz tensors (Google ViT layout)")
    else:
        args = _vit_args_from_state_dict(state)
        if num_heads is None:
            notes.append(
                f"no {side.name}: heads assumed width // 64 = {args['num_heads']} "
                "(pass num_heads= if the checkpoint used another head width)"
            )
    if num_heads is not None:
        args["num_heads"] = int(num_heads)
    try:
        model = _build_timm_vit(meta.get("model_name"), args)
        if state is None:
            load_checkpoint(model, str(path), strict=True)  # .npz: timm's Google-layout reader
        else:
            model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise ModelError(
            f"could not load {path} into a timm VisionTransformer({args}): {err}; "
            f"if the architecture is wrong, write {side.name} with "
            '{"model_name": ..., "model_args": {...}}'
        ) from None
    mean, std = _normalisation(model)
    mean, std = tuple(meta.get("mean", mean)), tuple(meta.get("std", std))
    return Vit2D(model.eval(), f"file:{path}", mean, std, notes)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file, never running
    pickled code: torch files load with ``weights_only=True`` (timm's default)."""
    import pickle

    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path))
    except Exception as err:  # noqa: BLE001 - pickled code, truncated zip, not a checkpoint, ...
        # torch raises UnpicklingError; timm >= 1.0.20 re-raises it as a RuntimeError
        if isinstance(err, pickle.UnpicklingError) or isinstance(
            err.__cause__, pickle.UnpicklingError
        ):
            found = re.search(r"Unsupported globals?: (?:GLOBAL )?([\w.]+)", str(err))
            what = f" (it pickles {found.group(1)})" if found else ""
            raise ModelError(
                f"{path} is not a weights-only checkpoint{what}; neuroray does not unpickle "
                "code from files: re-save it as torch.save(model.state_dict(), ...) or as "
                ".safetensors"
            ) from None
        message = str(err).splitlines()[0] if str(err) else ""
        raise ModelError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {message})"
        ) from None


def _build_timm_vit(model_name: str | None, args: Mapping[str, Any]) -> VisionTransformer:
    import timm

    args = dict(args)
    args.setdefault("num_classes", 0)
    if model_name:
        try:
            return timm.create_model(model_name, pretrained=False, **args)
        except RuntimeError as err:  # unknown model name
            raise ModelError(f"timm does not know model {model_name!r}: {err}") from None
    return VisionTransformer(**args)


def _square(n: int) -> int | None:
    root = math.isqrt(n)
    return root if root * root == n else None


def _vit_args_from_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """VisionTransformer arguments read off a timm ViT state dict (heads: width // 64)."""
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        heads = sorted({k.split(".")[0] for k in sd})[:10]
        raise ModelError(
            "checkpoint is not a timm VisionTransformer state dict (no patch_embed.proj.weight / "
            f"pos_embed; top-level names {heads}); export it with timm key names"
        )
    proj = sd["patch_embed.proj.weight"]
    width, in_chans, py, px = (int(s) for s in proj.shape)
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    class_token = "cls_token" in sd
    reg_tokens = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    prefix = int(class_token) + reg_tokens
    n_pos = int(sd["pos_embed"].shape[1])
    if prefix and _square(n_pos - prefix):
        side, no_embed_class = _square(n_pos - prefix), False
    elif _square(n_pos):
        side, no_embed_class = _square(n_pos), True
    else:
        raise ModelError(f"pos_embed with {n_pos} positions is not a square grid (+prefix tokens)")
    args: dict[str, Any] = {
        "img_size": (side * py, side * px),
        "patch_size": (py, px),
        "in_chans": in_chans,
        "embed_dim": width,
        "depth": depth,
        "num_heads": max(1, width // 64),
        "mlp_ratio": hidden / width,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "class_token": class_token,
        "reg_tokens": reg_tokens,
        "no_embed_class": no_embed_class and prefix > 0,
        "num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
    }
    if "blocks.0.ls1.gamma" in sd:
        args["init_values"] = 1.0
    if "blocks.0.attn.q_norm.weight" in sd:
        args["qk_norm"] = True
    if "norm_pre.weight" in sd:
        args["pre_norm"] = True
    if "fc_norm.weight" in sd:
        args["global_pool"], args["fc_norm"] = "avg", True
    if "norm.weight" not in sd:
        args["final_norm"] = False
    return args


NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def _vit_args_from_npz(path: Path) -> dict[str, Any]:
    """VisionTransformer arguments from a Google ``.npz`` ViT (augreg / big_vision layouts).

    Reads the shapes timm's ``_load_weights`` reads: per-block (``encoderblock_{i}``) or scanned
    (``encoderblock`` with a leading depth axis) blocks, under any of :data:`NPZ_PREFIXES`.
    """
    with np.load(path) as npz:
        shapes = {k: tuple(npz[k].shape) for k in npz.files}
    prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in shapes), None)
    if prefix is None:
        raise ModelError(
            f"{path} is not a Google ViT .npz (no embedding/kernel); write "
            f"{sidecar_path(path).name} with {{'model_name': <timm name>, 'model_args': {{...}}}}"
        )
    t = f"{prefix}Transformer/"
    py, px, in_chans, width = shapes[f"{prefix}embedding/kernel"]
    scanned = f"{t}encoderblock/LayerNorm_0/scale" in shapes
    block = f"{t}encoderblock/" if scanned else f"{t}encoderblock_0/"
    query = next(
        (v for k, v in shapes.items() if k.startswith(block) and k.endswith("query/kernel")), None
    )
    mlp = next(
        (v for k, v in shapes.items() if k.startswith(block) and k.endswith("Dense_0/kernel")), None
    )
    pos = shapes.get(f"{prefix}pos_embedding") or shapes.get(f"{t}posembed_input/pos_embedding")
    if query is None or mlp is None or pos is None:
        raise ModelError(
            f"{path}: unrecognised ViT .npz layout; write {sidecar_path(path).name} naming the "
            "timm model"
        )
    if scanned:
        depth = shapes[f"{t}encoderblock/LayerNorm_0/scale"][0]
        query, mlp = query[1:], mlp[1:]
    else:
        depth = len(
            {k[len(t) :].split("/")[0] for k in shapes if k.startswith(f"{t}encoderblock_")}
        )
    class_token = f"{prefix}cls" in shapes
    n_pos = pos[-2]
    side, class_position = _square(n_pos), False
    if side is None and class_token:
        side, class_position = _square(n_pos - 1), True
    if side is None:
        raise ModelError(f"{path}: {n_pos} position embeddings do not form a square grid")
    head = shapes.get(f"{prefix}head/kernel")
    return {
        "img_size": (side * py, side * px),
        "patch_size": (py, px),
        "in_chans": in_chans,
        "embed_dim": width,
        "depth": depth,
        "num_heads": query[1],
        "mlp_ratio": mlp[1] / width,
        "class_token": class_token,
        "no_embed_class": class_token and not class_position,
        "num_classes": head[-1] if head else 0,
    }


# ----------------------------------------------------------------------------------------------
# the transfer


def _check_supported(vit: VisionTransformer) -> None:
    problems = []
    if not isinstance(getattr(vit, "pos_embed", None), Tensor):
        problems.append("no absolute position embedding (rotary or none)")
    if not isinstance(vit.patch_embed.proj, nn.Conv2d):
        problems.append(f"patch embedding is {type(vit.patch_embed.proj).__name__}, not Conv2d")
    if not isinstance(getattr(vit.patch_embed, "norm", nn.Identity()), nn.Identity):
        problems.append("a norm inside the patch embedding")
    if not isinstance(vit.norm_pre, nn.Identity):
        problems.append("pre-norm (norm_pre, e.g. CLIP)")
    block = vit.blocks[0]
    if type(block) is not Block:
        problems.append(f"{type(block).__name__} blocks (only timm's pre-norm Block)")
    else:
        for name in ("attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm"):
            if not isinstance(block.get_submodule(name), nn.Identity):
                problems.append(f"blocks.*.{name} (qk-norm / scale-norm)")
        act = getattr(block.mlp, "act", None)
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            problems.append(f"MLP activation {type(act).__name__} (ViT3D uses exact GELU)")
    if problems:
        raise ModelError(
            "this 2D ViT cannot be copied into ViT3D: " + "; ".join(problems) + ". Choose a "
            "plain timm ViT (e.g. vit_small_patch16_224.dino, deit3_small_patch16_224)"
        )


def _grey_kernel(
    weight: Tensor, bias: Tensor, mean: Sequence[float], std: Sequence[float], fold: bool
) -> tuple[Tensor, Tensor]:
    """Sum a [C, 3, py, px] kernel over RGB (optionally folding in (x - mean) / std)."""
    if not fold:
        return weight.sum(1), bias.clone()
    std_t = torch.as_tensor(std, dtype=weight.dtype).reshape(1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=weight.dtype).reshape(1, -1, 1, 1)
    if std_t.numel() != weight.shape[1]:
        raise ModelError(f"normalisation has {std_t.numel()} channels, kernel {weight.shape[1]}")
    scaled = weight / std_t
    return scaled.sum(1), bias - (scaled * mean_t).sum((1, 2, 3))


def transfer_vit2d(
    vit2d: VisionTransformer | Vit2D,
    img_size: Sequence[int],
    patch_size: Sequence[int] | None = None,
    inflate: Inflate = "center",
    *,
    keep_cls_token: bool = True,
    fold_normalization: bool = False,
    drop_path: float = 0.0,
    source: str | None = None,
) -> tuple[ViT3D, TransferReport]:
    """Build a ViT3D (pos_embed="yx_depth") from a 2D timm ViT; see the module docstring.

    img_size: the 3D crop (z, y, x); patch_size: the 3D patch, default (4, *2D patch).
    """
    loaded = vit2d if isinstance(vit2d, Vit2D) else None
    vit = loaded.model if loaded else vit2d
    if not isinstance(vit, VisionTransformer):
        raise ModelError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    _check_supported(vit)
    inflation = INFLATIONS.get(inflate)  # an unknown mode fails before any work
    sd = {k: v.detach().float().cpu() for k, v in vit.state_dict().items()}
    weight2d = sd["patch_embed.proj.weight"]
    patch2d = tuple(int(p) for p in weight2d.shape[2:])
    patch = tuple(int(p) for p in (patch_size or (4, *patch2d)))
    if len(patch) != 3:
        raise ModelError(f"patch_size must be (z, y, x), got {patch}")
    mean, std = (loaded.mean, loaded.std) if loaded else _normalisation(vit)

    width = int(weight2d.shape[0])
    block = vit.blocks[0]
    hidden = int(block.mlp.fc1.out_features)
    config = ViTConfig(
        size=None,
        width=width,
        depth=len(vit.blocks),
        heads=int(block.attn.num_heads),
        mlp_ratio=hidden / width,
        patch_size=patch,
        img_size=tuple(int(s) for s in img_size),
        in_chans=1,
        pos_embed="yx_depth",
        cls_token=keep_cls_token and vit.cls_token is not None,
        drop_path=drop_path,
        qkv_bias=block.attn.qkv.bias is not None,
    )
    encoder = build_vit3d(config)
    own = encoder.state_dict()
    if own["blocks.0.mlp.fc1.weight"].shape[0] != hidden:
        raise ModelError(f"MLP width {hidden} of the 2D model is not reproducible from a ratio")
    report = TransferReport(
        source=source or (loaded.source if loaded else type(vit).__name__),
        inflate=inflate,
        config=config,
        notes=list(loaded.notes) if loaded else [],
    )
    new_state: dict[str, Tensor] = {}
    used: set[str] = set()

    # blocks and final norm: copied, layer scale folded
    for key in own:
        if not key.startswith(("blocks.", "norm.")):
            continue
        if key not in sd:
            if key.startswith("norm."):
                report.new.append(key)  # e.g. fc_norm models have no final norm
                continue
            raise ModelError(f"the 2D model has no {key}; it does not follow timm's ViT layout")
        value, used_key = sd[key], {key}
        m = re.match(r"blocks\.(\d+)\.(attn\.proj|mlp\.fc2)\.(weight|bias)$", key)
        gamma_key = (
            m and f"blocks.{m.group(1)}.{'ls1' if m.group(2) == 'attn.proj' else 'ls2'}.gamma"
        )
        if gamma_key and gamma_key in sd:
            gamma = sd[gamma_key]
            value = gamma[:, None] * value if m.group(3) == "weight" else gamma * value
            used_key.add(gamma_key)
            report.folded.append(key)
        else:
            report.copied.append(key)
        new_state[key] = value
        used |= used_key

    # patch embedding: RGB summed, resized to the 3D patch's (y, x), inflated along z
    grey, bias = _grey_kernel(weight2d, sd["patch_embed.proj.bias"], mean, std, fold_normalization)
    if patch2d != patch[1:]:
        from timm.layers import resample_patch_embed

        grey = resample_patch_embed(grey[:, None], list(patch[1:]))[:, 0]
        report.notes.append(f"2D patch {patch2d} resampled to {patch[1:]} (FlexiViT PI-resize)")
    new_state["patch_embed.proj.weight"] = inflation(grey, patch[0])
    report.inflated.append("patch_embed.proj.weight")
    new_state["patch_embed.proj.bias"] = bias
    (report.folded if fold_normalization else report.copied).append("patch_embed.proj.bias")
    used |= {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    if fold_normalization:
        report.notes.append(f"input normalisation mean {tuple(mean)} std {tuple(std)} folded in")

    # position embeddings: 2D grid -> (Ny, Nx), shared over z; class position into cls_token
    pos = sd["pos_embed"]
    pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    grid2d = tuple(int(g) for g in vit.patch_embed.grid_size)
    grid_pos = pos[:, pos_prefix:]
    if grid_pos.shape[1] != grid2d[0] * grid2d[1]:
        raise ModelError(
            f"2D pos_embed has {grid_pos.shape[1]} grid positions, expected {grid2d[0]}x{grid2d[1]}"
        )
    _, ny, nx = encoder.grid
    grid_pos = grid_pos.reshape(1, 1, *grid2d, width)
    new_state["pos_embed"] = resize_pos_embed(grid_pos, (1, ny, nx))
    report.interpolated.append("pos_embed")
    if grid2d != (ny, nx):
        report.notes.append(f"2D position grid {grid2d} interpolated to (y, x) {(ny, nx)}")
    used.add("pos_embed")
    report.new.append("depth_embed")  # zeros: every z slice starts as the 2D tokens
    if config.cls_token:
        cls = sd["cls_token"]
        if pos_prefix:
            cls = cls + pos[:, :1]
            report.folded.append("cls_token")
        else:
            report.copied.append("cls_token")
        new_state["cls_token"] = cls
        used.add("cls_token")

    for key in report.new:
        new_state.setdefault(key, own[key])
    encoder.load_state_dict(new_state, strict=True)
    report.dropped = sorted(k for k in sd if k not in used)
    for group in (report.copied, report.folded, report.new):
        group.sort(key=_natural_key)
    _note_eps(vit, report)
    return encoder, report


def _natural_key(key: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _note_eps(vit: VisionTransformer, report: TransferReport) -> None:
    eps = {m.eps for m in vit.modules() if isinstance(m, nn.LayerNorm)}
    if eps and eps != {1e-6}:
        report.notes.append(f"2D LayerNorm eps {sorted(eps)} differs from ViT3D's 1e-6")


# ----------------------------------------------------------------------------------------------
# entry points


def encoder_from_2d(
    source: str,
    img_size: Sequence[int],
    patch_size: Sequence[int] | None = None,
    inflate: Inflate = "center",
    *,
    keep_cls_token: bool = True,
    fold_normalization: bool = False,
    drop_path: float = 0.0,
    num_heads: int | None = None,
) -> tuple[ViT3D, TransferReport]:
    """The 3D encoder of a 2D source (``"timm:<name>"`` or ``"file:<path>"``) and its report."""
    vit2d = load_vit2d(source, num_heads=num_heads)
    return transfer_vit2d(
        vit2d,
        img_size,
        patch_size,
        inflate,
        keep_cls_token=keep_cls_token,
        fold_normalization=fold_normalization,
        drop_path=drop_path,
    )
