"""Image data sets as in-memory tensors: the embedded MNIST sample, MNIST and Fashion-MNIST.

``load_dataset(name)`` returns ``(train, test)`` :class:`ImageArrays`, uint8
images ``[N, 28, 28]`` and int64 labels. :class:`ImageDataset` serves them as
normalised float tensors and fetches whole batches at once (``__getitems__``),
so a DataLoader does one indexing op per batch instead of one per sample.

Examples:
    >>> train, test = load_dataset("mnist_small")
    >>> train.images.shape, test.images.shape, train.labels.dtype
    (torch.Size([4000, 28, 28]), torch.Size([1000, 28, 28]), torch.int64)
"""

from __future__ import annotations

import gzip
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_colearn.data.sources import TensorSource

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DatasetNotFoundError",
    "ImageArrays",
    "ImageDataset",
    "load_dataset",
    "preset",
    "read_idx",
]

DATASETS = ("mnist_small", "mnist", "fashion_mnist")
#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: Per-data-set pixel mean and std (of x / 255) on the training split.
NORMALISATION = {"mnist_small": (0.1307, 0.3081), "mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}
#: Class names where they are not the digits themselves.
CLASS_NAMES = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not where the config says, and could not be downloaded."""


@dataclass(frozen=True)
class ImageArrays:
    """One split of an image data set: uint8 images ``[N, H, W]`` and int64 labels ``[N]``."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)


class ImageDataset(TensorSource):
    """Normalised ``[1, H, W]`` float images and their labels, held in memory: a :class:`TensorSource`.

    The float conversion is done once here, not per sample; ``__getitems__``
    returns a ready batch ``(images, labels)``, to be used with
    :func:`collate_batch`.
    """

    def __init__(self, arrays: ImageArrays, mean: float, std: float, classes: list[str] | None = None) -> None:
        super().__init__(((arrays.images.float() / 255.0 - mean) / std).unsqueeze(1).contiguous(), arrays.labels,
                         task="classification", classes=classes)

    @property
    def images(self) -> Tensor:
        return self.inputs


def collate_batch(batch):
    """DataLoader ``collate_fn`` for :class:`ImageDataset`: a batch from ``__getitems__`` is already collated."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], Tensor):
        return batch
    return torch.utils.data.default_collate(batch)


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = False) -> tuple[ImageArrays, ImageArrays]:
    """Return the ``(train, test)`` splits of ``name`` (one of :data:`DATASETS`).

    ``mnist_small`` is the 4,000 / 1,000 real MNIST sample shipped in the
    package. ``mnist`` and ``fashion_mnist`` are read with torchvision from
    ``root`` (downloaded there when ``download``); ``fashion_mnist`` also
    reads the IDX ``.gz`` files that the Debian package
    ``dataset-fashion-mnist`` installs under ``/usr/share/datasets/fashion-mnist``.
    A ``root`` that directly holds the four IDX files (``.gz`` or not) is
    read as is. Files on disk are always preferred to a download.
    """
    if name == "mnist_small":
        return _load_embedded()
    if name not in DATASETS:
        raise ValueError(f"data set must be one of {DATASETS}, got {name!r}")
    root = Path(root).expanduser() if root is not None else default_root()
    # Look for files already on disk before any download: IDX files directly
    # in root, then torchvision's layout, then (Fashion-MNIST) Debian's copy.
    if _has_idx(root):
        return _read_idx_dir(root)
    if not _has_torchvision(root, name) and name == "fashion_mnist" and _has_idx(DEBIAN_FASHION_MNIST):
        return _read_idx_dir(DEBIAN_FASHION_MNIST)
    return _load_torchvision(name, root, download)


def preset(name: str, root: str | os.PathLike | None = None, download: bool = False) -> tuple[ImageDataset, ImageDataset]:
    """The ``(train, test)`` sources of a named preset: :func:`load_dataset`'s images, normalised.

    The presets are definitions on the path every data set takes: tensor sources
    with the data set's own test split as the shared evaluation set.

    Examples:
        >>> train, test = preset("mnist_small")
        >>> train.inputs.shape, test.task, train.classes[:3]
        (torch.Size([4000, 1, 28, 28]), 'classification', [0, 1, 2])
    """
    train, test = load_dataset(name, root, download)
    mean, std = NORMALISATION[name]
    classes = CLASS_NAMES.get(name)
    return ImageDataset(train, mean, std, classes), ImageDataset(test, mean, std, classes)


def default_root() -> Path:
    """``$COLEARN_DATA`` if set, else ``~/.cache/lightning_colearn``."""
    return Path(os.environ.get("COLEARN_DATA", Path.home() / ".cache" / "lightning_colearn"))


def _load_embedded() -> tuple[ImageArrays, ImageArrays]:
    with importlib.resources.files("lightning_colearn.data").joinpath("mnist_small.npz").open("rb") as f:
        data = np.load(f)
        arrays = {k: torch.from_numpy(data[k]) for k in data.files}
    return tuple(  # type: ignore[return-value]
        ImageArrays(arrays[f"{s}_images"], arrays[f"{s}_labels"].long()) for s in ("train", "test")
    )


def _torchvision_class(name: str):
    from torchvision import datasets  # torchvision is heavy: import only when a full data set is asked for

    return {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]


def _has_torchvision(root: Path, name: str) -> bool:
    folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
    return _has_idx(root / folder / "raw")


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[ImageArrays, ImageArrays]:
    cls = _torchvision_class(name)
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
            raise DatasetNotFoundError(_missing_message(name, root, download)) from err
        except OSError as err:  # a download attempt without network
            raise DatasetNotFoundError(_missing_message(name, root, download, reason=str(err))) from err
        splits.append(ImageArrays(ds.data.to(torch.uint8), ds.targets.long()))
    return splits[0], splits[1]


def _missing_message(name: str, root: Path, download: bool, reason: str | None = None) -> str:
    folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
    lines = [f"data set {name!r} not found under {root / folder / 'raw'}"]
    if download:
        lines.append(f"downloading it failed ({reason or 'no network?'})")
    else:
        lines.append("data.download is false")
    lines.append(
        f"fix: set data.root to a folder holding {folder}/raw/train-images-idx3-ubyte(.gz) and the other IDX files"
        + (", or data.download=true on a machine with internet" if not download else "")
    )
    if name == "fashion_mnist":
        lines.append(f"or install the Debian package dataset-fashion-mnist (files in {DEBIAN_FASHION_MNIST})")
    lines.append("or use data=mnist_small, which ships with the package")
    return "; ".join(lines)


def _has_idx(folder: Path) -> bool:
    return all(_find(folder, f) is not None for pair in _IDX_FILES.values() for f in pair)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_dir(folder: Path) -> tuple[ImageArrays, ImageArrays]:
    return _read_idx_split(folder, "train"), _read_idx_split(folder, "test")


def _read_idx_split(folder: Path, split: str) -> ImageArrays:
    images, labels = (read_idx(_find(folder, stem)) for stem in _IDX_FILES[split])  # type: ignore[arg-type]
    return ImageArrays(torch.from_numpy(images), torch.from_numpy(labels).long())


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not, into a numpy array.

    The header is: two zero bytes, a type code (0x08 = uint8), the number of
    dimensions, then each dimension as a big-endian uint32.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (header {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or padded: {len(data)} bytes, header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()


def sklearn_dataset(name: str = "digits", **kwargs) -> torch.utils.data.TensorDataset:
    """One of scikit-learn's bundled data sets (``load_<name>``: digits, iris, breast_cancer, wine, diabetes, ...)
    as a ``TensorDataset`` of float32 features and labels (float targets for regression sets such as diabetes).

    They ship inside scikit-learn, so they work offline; ``kwargs`` go to the loader.
    Needs scikit-learn (the ``sklearn`` extra).

    Examples:
        >>> x, y = sklearn_dataset("digits").tensors
        >>> x.shape, x.dtype, y[:5].tolist()
        (torch.Size([1797, 64]), torch.float32, [0, 1, 2, 3, 4])
    """
    try:
        from sklearn import datasets as sk
    except ImportError as err:  # an optional dependency
        raise ImportError("sklearn_dataset needs scikit-learn: pip install 'lightning-colearn[sklearn]'") from err
    loader = getattr(sk, f"load_{name}", None)
    if loader is None or name.startswith("svm"):
        bundled = sorted(n[5:] for n in dir(sk) if n.startswith("load_") and n not in ("load_files", "load_sample_image", "load_sample_images", "load_svmlight_file", "load_svmlight_files"))
        raise ValueError(f"data.dataset.name must be one of scikit-learn's bundled sets {bundled}, got {name!r}")
    x, y = loader(return_X_y=True, **kwargs)
    target = torch.as_tensor(y)
    return torch.utils.data.TensorDataset(torch.as_tensor(x, dtype=torch.float32),
                                          target.float() if target.is_floating_point() else target.long())
