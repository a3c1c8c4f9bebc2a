"""``sib-train --pretrained SPEC``: the weights a run starts from, found without any network access.

``SPEC`` is a local file (a state dict, or a checkpoint holding one under a usual key such as
``model`` or ``state_dict``: ``sib-train``'s own ``checkpoint.pt`` too; ``.safetensors`` files
as well), or a name: for a torchvision ``--arch`` a member of its weights enum (``IMAGENET1K_V2``,
``DEFAULT``), for a timm ``--arch`` a pretrained tag (``a1_in1k``, or ``default``). A name is
looked up only where those libraries keep their downloads, torchvision's in
``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub``), timm's in the Hugging Face hub cache
(``$HF_HUB_CACHE``, ``$HF_HOME/hub``) or, for its older URL weights, torchvision's folder: nothing is
ever downloaded, and a name that is not cached is one line saying where it was looked for and how
to give a file instead.

``locate`` (at argument checking) finds the file; ``load_into`` reads it and loads it into the
model: every tensor must fit by name and shape, except the classifier's when the number of
classes differs, which keeps its fresh initialisation (and the run says so).
"""
from __future__ import annotations

import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from sib_fast.cli_errors import UsageError
from sib_fast.training.models import ALIASES, BUILTIN, torchvision_names

#: where a checkpoint file usually keeps its state dict
STATE_KEYS = ("model", "state_dict", "model_state_dict", "model_state", "module", "net", "weights")
#: prefixes that wrappers add to every key: DDP, torch.compile, sib-eval's Normalized
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
FILE_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".safetensors", ".tar")
HOW_TO_PROVIDE = ("download it on a machine with network access (or copy the file) and pass --pretrained "
                  "FILE, or put it in that cache")


@dataclass
class Source:
    """Where ``--pretrained`` found its weights."""
    spec: str
    path: Path
    kind: str                  # "file", "torchvision" or "timm"
    classifier: str | None = None  # the classifier's module name, when the library says it


def _is_file_spec(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.endswith(FILE_SUFFIXES) or Path(spec).exists()


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home) / "hub"


def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"  # follows $TORCH_HOME at each call


def _torchvision_source(spec: str, arch: str) -> Source:
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise UsageError(f"--pretrained {spec!r}: torchvision has no weights for --arch {arch}; give a file") from None
    names = [n for n in enum.__members__]
    if spec not in names:
        raise UsageError(f"--pretrained {spec!r}: no such file, and torchvision's {arch} weights are "
                         f"{', '.join(names)}")
    weights = enum[spec]
    path = _torch_hub_checkpoints() / os.path.basename(urlparse(weights.url).path)
    if not path.is_file():
        raise UsageError(f"--pretrained {spec}: torchvision's {arch} weights {weights} are not in the cache "
                         f"(looked for {path}; nothing is downloaded): {HOW_TO_PROVIDE}")
    return Source(spec, path, "torchvision")


def _timm_source(spec: str, arch: str) -> Source:
    import timm
    from timm.models import get_pretrained_cfg

    name = arch[5:] if arch.startswith("timm/") else arch
    base, _, arch_tag = name.partition(".")
    tag = arch_tag if spec == "default" and arch_tag else spec
    full = base if tag == "default" else f"{base}.{tag}"
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")]
    try:
        cfg = get_pretrained_cfg(full)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        known = ", ".join(["default", *tags]) if tags else "none"
        raise UsageError(f"--pretrained {spec!r}: no such file, and timm's {base} pretrained tags are {known}")
    looked = []
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        folder = _hf_hub_cache() / ("models--" + repo.replace("/", "--"))
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            path = _cached_snapshot(folder, filename)
            if path is not None:
                return Source(spec, path, "timm", cfg.classifier)
        looked.append(str(folder / "snapshots" / "*" / "model.safetensors"))
    if cfg.url:
        path = _torch_hub_checkpoints() / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return Source(spec, path, "timm", cfg.classifier)
        looked.append(str(path))
    where = " or ".join(looked) if looked else "nowhere: timm has no file for it"
    raise UsageError(f"--pretrained {spec}: timm's {full} weights are not in the cache (looked for {where}; nothing "
                     f"is downloaded): {HOW_TO_PROVIDE}")


def _cached_snapshot(folder: Path, filename: str) -> Path | None:
    """The Hugging Face cache's copy of ``filename``: the snapshot ``refs/main`` names, else any."""
    try:
        ref = (folder / "refs" / "main").read_text().strip()
    except OSError:
        ref = None
    candidates = [folder / "snapshots" / ref / filename] if ref else []
    candidates += sorted((folder / "snapshots").glob(f"*/{filename}"))
    return next((p for p in candidates if p.is_file()), None)


def locate(spec: str, arch: str) -> Source:
    """Where the weights of ``--pretrained spec`` are, checked for damage; a one-line ``UsageError`` if not found."""
    if _is_file_spec(spec):
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--pretrained {spec}: no such file")
        source = Source(spec, path, "file")
    elif arch in BUILTIN or arch in ALIASES:
        raise UsageError(f"--pretrained {spec!r}: no such file (a weights name needs a torchvision or timm --arch; "
                         f"for {arch} give a file)")
    elif not arch.startswith("timm/") and arch in torchvision_names():
        source = _torchvision_source(spec, arch)
    else:
        source = _timm_source(spec, arch)
    _check_intact(source.path)
    return source


def _check_intact(path: Path) -> None:
    """Zip archives (torch.save) with every member's CRC-32; others are checked when read."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UsageError(f"--pretrained: cannot read {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise UsageError(f"--pretrained {path}: the file is empty (0 bytes)")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as exc:
            raise UsageError(f"--pretrained {path} is damaged (unreadable zip archive: {exc})") from None
        if bad is not None:
            raise UsageError(f"--pretrained {path} is damaged (CRC-32 mismatch in {bad}); download or copy it again")


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:300]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (a state dict, or a checkpoint holding one under ``STATE_KEYS``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the reader says, it is one line
        raise UsageError(f"--pretrained {path} is damaged or not a PyTorch weights file ({_first_line(exc)})") from None
    state = obj
    if isinstance(obj, dict) and not _is_state_dict(obj):
        state = next((obj[k] for k in STATE_KEYS if k in obj and _is_state_dict(obj[k])), None)
    if not _is_state_dict(state):
        what = (f"a dict with keys {', '.join(map(str, list(obj)[:8]))}" if isinstance(obj, dict)
                else f"a {type(obj).__name__}")
        raise UsageError(f"--pretrained {path} holds no state dict ({what}; looked under "
                         f"{', '.join(STATE_KEYS)})")
    return dict(state)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_wrappers(state: dict, own: set[str]) -> dict:
    """Drop a prefix that a wrapper put on every key and the model has not."""
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                               r"running_var))$")


def classifier_keys(model: nn.Module, num_classes: int, name: str | None = None) -> set[str]:
    """The state-dict keys of the classifier: module ``name`` when known, else the last linear (or
    1x1 convolution) layer with ``num_classes`` outputs."""
    modules = dict(model.named_modules())
    if name is None or name not in modules:
        name = None
        for n, m in modules.items():
            if (isinstance(m, nn.Linear) and m.out_features == num_classes) or (
                    isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1)):
                name = n
    if name is None:
        return set()
    return {f"{name}.{k}" if name else k for k in modules[name].state_dict()}


def _keys_line(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def load_into(model: nn.Module, source: Source, num_classes: int) -> tuple[list[str], str]:
    """Load ``source``'s weights into ``model``; returns (the classifier keys left at their fresh
    initialisation, a log line). Any other mismatch is a ``UsageError`` naming the keys."""
    own = model.state_dict()
    state = _strip_wrappers(read_state_dict(source.path), set(own))
    if any(_DENSENET_OLD_KEY.match(k) for k in state):  # torchvision's densenet files predate its key names
        state = {_DENSENET_OLD_KEY.sub(lambda m: m.group(1) + m.group(2), k): v for k, v in state.items()}
    head = classifier_keys(model, num_classes, source.classifier)
    wrong_shape = {k for k in state.keys() & own.keys() if state[k].shape != own[k].shape}
    # a classifier with another number of classes, or none (a headless export): left at its initialisation
    left_out = sorted(k for k in head if k not in state or k in wrong_shape)
    unexpected = set(state) - set(own)
    problems = []
    missing = [k for k in own if k not in state and k not in head and not k.endswith("num_batches_tracked")]
    if missing:
        problems.append(f"missing {_keys_line(missing)}")
    if unexpected:
        problems.append(f"unexpected {_keys_line(unexpected)}")
    bad_shapes = sorted(wrong_shape - head)
    if bad_shapes:
        problems.append("shapes differ for " + ", ".join(
            f"{k} ({tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here)" for k in bad_shapes[:4])
            + (f" and {len(bad_shapes) - 4} more" if len(bad_shapes) > 4 else ""))
    if problems:
        raise UsageError(f"--pretrained {source.spec}: {source.path} does not fit --arch's model: "
                         + "; ".join(problems))
    keep = {k: v for k, v in state.items() if k in own and k not in left_out}
    model.load_state_dict(keep, strict=False)
    line = f"--pretrained {source.spec}: loaded {len(keep)} tensors from {source.path}"
    if left_out:
        file_classes = next((tuple(state[k].shape)[0] for k in left_out if k in state), None)
        line += (f"; the classifier ({', '.join(left_out)}) is re-initialised for {num_classes} classes "
                 + (f"(the file has {file_classes})" if file_classes is not None else "(the file has none)")
                 + " and left out")
    return left_out, line
