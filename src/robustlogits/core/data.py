"""CIFAR-10/100 (and synthetic) as uint8 tensors on the training device.

Images are decoded once into uint8 arrays and cached under a key built from the source files'
names and contents, so a changed source is never served stale and a copied one is not decoded again. Training
batches are drawn and augmented (random crop with 4-pixel zero padding, horizontal flip) as
batched tensor code on the device: no per-image PIL in the training loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robustlogits.core.errors import UserError
from robustlogits.core.progress import Progress

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
_CACHE_VERSION = "1"


@dataclass
class RawDataset:
    """Decoded images (uint8, NCHW) and labels of the official train and test splits."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str
    digest: str
    root: str | None = None  # the folder searched, as an absolute path (what runs record)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --- locating and decoding ------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("ROBUSTLOGITS_CACHE", Path.home() / ".cache" / "robustlogits"))


def default_data_dirs() -> list[Path]:
    """Where data is looked for when no --data-dir is given: $ROBUSTLOGITS_DATA if set, else
    ./data and the project's shared data folder beside the checkout (../shared/data)."""
    if os.environ.get("ROBUSTLOGITS_DATA"):
        return [Path(os.environ["ROBUSTLOGITS_DATA"])]
    return [Path("data"), Path("..") / "shared" / "data"]


def load_raw(
    dataset: str,
    data_dir: str | Path | None = None,
    *,
    synthetic: dict | None = None,
    hint: str | Path | None = None,
    digest: str | None = None,
) -> RawDataset:
    """Find, decode (or read from cache) and return a dataset's train and test splits.

    `digest` (the content digest a model was trained on) makes the search fit for data that
    lives elsewhere on another machine: `hint` (the folder the model's run recorded), `data_dir`,
    $ROBUSTLOGITS_DATA and the defaults are all tried, and only data with that digest is taken.
    Without a digest, a given `data_dir` is the only place looked at.
    """
    if dataset == "synthetic":
        raw = make_synthetic(**(synthetic or {}))
        if digest and raw.digest != digest:
            raise UserError(f"synthetic data regenerated with digest {raw.digest}, the model was trained on {digest}")
        return raw
    if dataset not in ("cifar10", "cifar100"):
        raise UserError(f"unknown dataset {dataset!r}; choose one of: cifar10, cifar100, synthetic")
    roots = [Path(data_dir)] if data_dir else []
    if digest or not data_dir:
        roots += ([Path(hint)] if hint else []) + default_data_dirs()
    roots = list({str(r.expanduser().absolute()): r for r in roots}.values())
    looked: list[str] = []
    mismatched: list[str] = []
    for root in roots:
        found = _load_from_root(root, dataset, looked)
        if found is None:
            continue
        if digest and found.digest != digest:
            mismatched.append(f"{root.absolute()} holds digest {found.digest}")
            continue
        if mismatched:
            logging.getLogger(__name__).warning(
                "skipped data with another digest (%s); using %s", "; ".join(mismatched), root.absolute()
            )
        return dataclasses.replace(found, root=str(root.expanduser().resolve()))
    downloaded = None if mismatched else _try_torchvision_download(dataset, looked)
    if downloaded is not None:
        found = _load_from_dir(downloaded, dataset, looked)
        if found is not None and (not digest or found.digest == digest):
            return dataclasses.replace(found, root=str(downloaded.resolve()))
    where = " or ".join(str(r) for r in roots)
    if mismatched:
        raise UserError(
            f"no {dataset} data with the model's content digest {digest} found: {'; '.join(mismatched)}. "
            f"Also looked under {where}. Point --data-dir (or ROBUSTLOGITS_DATA) at the data the model was trained on."
        )
    raise UserError(
        f"no {dataset} data found under {where}. Looked for: {'; '.join(looked)}. "
        "Point --data-dir (or ROBUSTLOGITS_DATA) at a folder holding the official python pickles "
        f"({_pickle_dirname(dataset)}/), an image-folder layout (train/<class>/*.jpg, test/<class>/*.jpg), "
        "or a .tar.gz of either."
    )


def _load_from_root(root: Path, dataset: str, looked: list[str]) -> RawDataset | None:
    """Pickles, then an image folder, then a .tar.gz of either, in and just below `root`."""
    if not root.exists():
        looked.append(f"{root} (does not exist)")
        return None
    for candidate in _candidate_dirs(root, dataset):
        found = _load_from_dir(candidate, dataset, looked)
        if found is not None:
            return found
    archive = _find_archive(root, dataset)
    if archive is None:
        return None
    extracted = _extract_archive(archive)
    for candidate in _candidate_dirs(extracted, dataset):
        found = _load_from_dir(candidate, dataset, looked)
        if found is not None:
            return found
    looked.append(f"archive {archive} (extracted to {extracted}, no known layout inside)")
    return None


def _pickle_dirname(dataset: str) -> str:
    return "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"


def _candidate_dirs(root: Path, dataset: str) -> list[Path]:
    names = [root, root / dataset, root / _pickle_dirname(dataset)]
    if dataset == "cifar10":
        names.append(root / "cifar-10")
    else:
        names.append(root / "cifar-100")
    seen, out = set(), []
    for n in names:
        if n not in seen and n.is_dir():
            seen.add(n)
            out.append(n)
    return out


def _load_from_dir(directory: Path, dataset: str, looked: list[str]) -> RawDataset | None:
    pickles = directory / _pickle_dirname(dataset)
    for pdir in (pickles, directory):
        if _has_pickles(pdir, dataset):
            return _cached(
                dataset,
                "pickle",
                pdir,
                _pickle_files(pdir, dataset),
                lambda bar, pdir=pdir: _decode_pickles(pdir, dataset, bar),
            )
    looked.append(f"pickle layout {pickles}")
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        n_classes = sum(1 for p in (directory / "train").iterdir() if p.is_dir())
        expected = 10 if dataset == "cifar10" else 100
        files = (
            []
            if n_classes != expected
            else sorted(  # another dataset's folder: not decoded as this one
                p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
            )
        )
        if files:
            return _cached(
                dataset, "imagefolder", directory, files, lambda bar: _decode_image_folder(directory, dataset, bar)
            )
    looked.append(f"image-folder layout {directory}/train/<class>/, {directory}/test/<class>/")
    return None


def _pickle_files(directory: Path, dataset: str) -> list[Path]:
    if dataset == "cifar10":
        return [directory / f"data_batch_{i}" for i in range(1, 6)] + [directory / "test_batch"]
    return [directory / "train", directory / "test", directory / "meta"]


def _has_pickles(directory: Path, dataset: str) -> bool:
    return all(p.is_file() for p in _pickle_files(directory, dataset))


def _unpickle(path: Path, bar: Progress | None = None) -> dict:
    if bar is not None:
        bar.update(1)
    return _read_pickle(path)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any decode failure means corrupt data
        raise UserError(f"corrupt dataset file {path}: {exc}") from None


def _decode_pickles(directory: Path, dataset: str, bar: Progress) -> tuple:
    def images(d: dict) -> np.ndarray:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(f"corrupt dataset pickle in {directory}: expected rows of 3072 bytes, got {data.shape}")
        return data.reshape(-1, 3, 32, 32)

    if dataset == "cifar10":
        batches = [_unpickle(directory / f"data_batch_{i}", bar) for i in range(1, 6)]
        test = _unpickle(directory / "test_batch", bar)
        train_x = np.concatenate([images(b) for b in batches])
        train_y = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
        test_x, test_y = images(test), np.asarray(test[b"labels"])
        meta_path = directory / "batches.meta"
        classes = CIFAR10_CLASSES
        if meta_path.is_file():
            classes = tuple(n.decode() for n in _unpickle(meta_path)[b"label_names"])
    else:
        train, test, meta = (_unpickle(directory / n, bar) for n in ("train", "test", "meta"))
        train_x, test_x = images(train), images(test)
        train_y, test_y = np.asarray(train[b"fine_labels"]), np.asarray(test[b"fine_labels"])
        classes = tuple(n.decode() for n in meta[b"fine_label_names"])
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), classes


def _decode_image_folder(directory: Path, dataset: str, bar: Progress) -> tuple:
    from PIL import Image, UnidentifiedImageError

    classes = tuple(sorted(p.name for p in (directory / "train").iterdir() if p.is_dir()))
    test_classes = tuple(sorted(p.name for p in (directory / "test").iterdir() if p.is_dir()))
    if classes != test_classes:
        raise UserError(f"train and test class folders differ under {directory}")
    expected = 10 if dataset == "cifar10" else 100
    if len(classes) != expected:
        raise UserError(f"{directory} has {len(classes)} class folders; {dataset} needs {expected}")

    def read(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((directory / split / name).iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                bar.update(1)
                try:
                    with Image.open(path) as im:
                        img = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    raise UserError(f"corrupt image {path}: {exc}") from None
                if img.shape != (3, 32, 32):
                    raise UserError(f"image {path} has shape {img.shape}, expected 3x32x32")
                images.append(img)
                labels.append(label)
        if not images:
            raise UserError(f"no images under {directory / split}")
        return np.stack(images), np.asarray(labels, dtype=np.int64)

    train_x, train_y = read("train")
    test_x, test_y = read("test")
    return train_x, train_y, test_x, test_y, classes


def _fingerprint(files: list[Path], root: Path | None = None) -> str:
    """Key of a set of files by their bytes (and names relative to `root`), never by mtime.

    Hashing is memoised per (path, size, mtime) set, so an unchanged source costs only stat
    calls; a copy with a new mtime is hashed once and finds the same cache entry."""
    stats = hashlib.sha256(_CACHE_VERSION.encode())
    for path in files:
        st = path.stat()
        stats.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    memo = cache_root() / "content-keys" / f"{stats.hexdigest()[:32]}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256(_CACHE_VERSION.encode())
    for path in files:
        h.update(f"{path.relative_to(root).as_posix() if root else ''}\n".encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    key = h.hexdigest()[:20]
    memo.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=memo.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(key)
    os.replace(tmp.name, memo)
    return key


def array_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _cached(dataset: str, kind: str, directory: Path, files: list[Path], decode) -> RawDataset:
    key = _fingerprint(files, directory)
    path = cache_root() / "arrays" / f"{dataset}-{kind}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                log.info("%s: using the decoded cache %s", dataset, path)
                return RawDataset(
                    z["train_images"],
                    z["train_labels"],
                    z["test_images"],
                    z["test_labels"],
                    tuple(str(c) for c in z["classes"]),
                    f"{kind}:{directory}",
                    str(z["digest"]),
                )
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            path.unlink(missing_ok=True)
    log.info(
        "%s: decoding %d files from %s into %s (once: later runs read this cache)", dataset, len(files), directory, path
    )
    with Progress(len(files), f"decoding {dataset}", "file") as bar:
        train_x, train_y, test_x, test_y, classes = decode(bar)
    digest = array_digest(train_x, train_y, test_x, test_y)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp.npz", delete=False) as tmp:
        np.savez(
            tmp,
            train_images=train_x,
            train_labels=train_y,
            test_images=test_x,
            test_labels=test_y,
            classes=np.asarray(classes),
            digest=np.asarray(digest),
        )
    os.replace(tmp.name, path)
    return RawDataset(train_x, train_y, test_x, test_y, tuple(classes), f"{kind}:{directory}", digest)


def _find_archive(root: Path, dataset: str) -> Path | None:
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        return root
    if not root.is_dir():
        return None
    pattern = re.compile(r"cifar-?10(?!0)" if dataset == "cifar10" else r"cifar-?100", re.I)
    for path in sorted(root.iterdir()):
        if path.name.endswith((".tar.gz", ".tgz")) and pattern.search(path.name):
            return path
    return None


def _extract_archive(archive: Path) -> Path:
    """Extract once into the cache; the folder name carries the archive's fingerprint."""
    target = cache_root() / "extracted" / f"{archive.name.split('.')[0]}-{_fingerprint([archive])}"
    if (target / ".complete").is_file():
        return target
    log.info("extracting %s into %s (once: later runs reuse it)", archive, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        size = archive.stat().st_size
        with (
            open(archive, "rb") as raw,
            tarfile.open(fileobj=raw, mode="r|*") as tar,
            Progress(size, f"extracting {archive.name}", "B") as bar,
        ):
            for member in tar:  # streamed: progress follows the compressed bytes read
                tar.extract(member, tmp, filter="data")
                bar.update(raw.tell() - bar.done)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"corrupt archive {archive}: {exc}") from None
    (tmp / ".complete").touch()
    import shutil

    if (target / ".complete").is_file():  # another process (a second worker) finished first: use
        shutil.rmtree(tmp, ignore_errors=True)  # its copy, never delete a folder someone may be reading
        return target
    if target.exists():  # an unfinished leftover
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / ".complete").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _try_torchvision_download(dataset: str, looked: list[str]) -> Path | None:
    if os.environ.get("ROBUSTLOGITS_NO_DOWNLOAD"):
        looked.append("torchvision download (disabled by ROBUSTLOGITS_NO_DOWNLOAD)")
        return None
    from torchvision import datasets

    root = cache_root() / "download"
    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    try:
        cls(root=str(root), train=True, download=True)
        cls(root=str(root), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - offline machines fail in many ways
        looked.append(f"torchvision download into {root} ({type(exc).__name__})")
        return None
    return root


# --- synthetic data ---------------------------------------------------------------------------


def make_synthetic(
    train_per_class: int = 64, test_per_class: int = 16, num_classes: int = 10, size: int = 32, seed: int = 1234
) -> RawDataset:
    """Class-conditional images: a smooth per-class colour pattern plus per-image noise and shift.

    Learnable in a few steps by a tiny CNN, yet not separable by a single pixel, so training,
    attacks and logit statistics behave like on real data at a fraction of the cost.
    """
    if num_classes < 2 or train_per_class < 1 or test_per_class < 1:
        raise UserError("synthetic data needs >= 2 classes and >= 1 image per class per split")
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, size=(num_classes, 3, 4, 4))
    base = torch.nn.functional.interpolate(
        torch.from_numpy(coarse), size=(size, size), mode="bilinear", align_corners=False
    ).numpy()

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(num_classes), per_class)
        noise = rng.normal(0, 0.18, size=(len(labels), 3, size, size))
        brightness = rng.uniform(-0.15, 0.15, size=(len(labels), 1, 1, 1))
        imgs = base[labels] + noise + brightness
        shifts = rng.integers(-2, 3, size=(len(labels), 2))
        imgs = np.stack([np.roll(im, tuple(s), axis=(1, 2)) for im, s in zip(imgs, shifts)])
        return (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)

    train_x, train_y = split(train_per_class)
    test_x, test_y = split(test_per_class)
    classes = tuple(f"class{i}" for i in range(num_classes))
    return RawDataset(
        train_x,
        train_y,
        test_x,
        test_y,
        classes,
        f"synthetic:seed={seed}",
        array_digest(train_x, train_y, test_x, test_y),
    )


# --- splits -------------------------------------------------------------------------------------


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices with class proportions kept (largest-remainder rounding), sorted, seeded."""
    labels = np.asarray(labels)
    if not 1 <= n <= len(labels):
        raise UserError(f"cannot take {n} examples from a split of {len(labels)}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def split_validation(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): per_class random images of each class held out."""
    if per_class <= 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class:
            raise UserError(f"class {c} has {len(members)} training images; cannot hold out {per_class}")
        val.append(rng.choice(members, size=per_class, replace=False))
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


@dataclass
class Split:
    """Images (uint8, NCHW, on the device), labels, and their indices into the source split."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: np.ndarray, name: str | None = None) -> Split:
        pos = torch.as_tensor(positions, device=self.labels.device)
        return Split(name or self.name, self.images[pos], self.labels[pos], self.indices[positions])


@dataclass
class DataBundle:
    train: Split  # what the optimiser sees (augmented)
    stats: Split  # fixed, un-augmented train subset whose logits are tracked
    heldout: Split  # validation (CIFAR-10) or test (CIFAR-100) images tracked every epoch
    test: Split  # the official test split (checkpoint logits, attacks)
    classes: tuple[str, ...]
    digest: str
    source: str
    split_record: dict  # what makes the split reproducible, logged as an artifact
    root: str | None = None  # absolute folder the data was found in (None: generated)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_bundle(
    raw: RawDataset,
    *,
    val_per_class: int,
    split_seed: int,
    train_subset: int | None,
    stats_subset: int,
    heldout_subset: int | None,
    device: torch.device,
) -> DataBundle:
    train_idx, val_idx = split_validation(raw.train_labels, val_per_class, split_seed)
    if train_subset is not None:
        if train_subset > len(train_idx):
            raise UserError(f"train_subset {train_subset} exceeds the {len(train_idx)} training images")
        train_idx = train_idx[stratified_indices(raw.train_labels[train_idx], train_subset, split_seed + 1)]

    def make(name: str, images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> Split:
        return Split(name, torch.from_numpy(images[idx]).to(device), torch.from_numpy(labels[idx]).to(device), idx)

    train = make("train", raw.train_images, raw.train_labels, train_idx)
    stats_pos = stratified_indices(train.labels.cpu().numpy(), min(stats_subset, len(train)), split_seed + 2)
    stats = train.subset(stats_pos, "train_stats")
    test = make("test", raw.test_images, raw.test_labels, np.arange(len(raw.test_labels)))
    heldout = make("val", raw.train_images, raw.train_labels, val_idx) if len(val_idx) else test
    if heldout_subset is not None and heldout_subset < len(heldout):
        heldout = heldout.subset(stratified_indices(heldout.labels.cpu().numpy(), heldout_subset, split_seed + 3))
    record = {
        "val_per_class": val_per_class,
        "split_seed": split_seed,
        "train_subset": train_subset,
        "train_indices": train_idx.tolist(),
        "val_indices": val_idx.tolist(),
        "stats_indices": stats.indices.tolist(),
        "heldout_split": heldout.name,
        "heldout_indices": heldout.indices.tolist(),
    }
    return DataBundle(train, stats, heldout, test, raw.classes, raw.digest, raw.source, record, raw.root)


# --- batches and augmentation -------------------------------------------------------------------


def load_bundle(cfg, device: torch.device, *, hint: str | None = None, digest: str | None = None) -> DataBundle:
    """The splits a training config asks for (`cfg`: a TrainConfig), on `device`; `hint` and
    `digest` find a model's training data again (see `load_raw`)."""
    d = cfg.data
    raw = load_raw(
        d.dataset,
        d.data_dir,
        hint=hint,
        digest=digest,
        synthetic=dict(
            train_per_class=d.synthetic_train_per_class,
            test_per_class=d.synthetic_test_per_class,
            num_classes=d.synthetic_classes,
            size=d.synthetic_size,
        ),
    )
    return build_bundle(
        raw,
        val_per_class=cfg.resolved_val_per_class(),
        split_seed=d.split_seed,
        train_subset=d.train_subset,
        stats_subset=d.stats_subset,
        heldout_subset=d.heldout_subset,
        device=device,
    )


def load_test_split(
    dataset: str,
    data_dir: str | None,
    device: torch.device,
    synthetic_params: dict | None = None,
    *,
    hint: str | None = None,
    digest: str | None = None,
):
    """The whole official test split (and the raw dataset it came from)."""
    raw = load_raw(dataset, data_dir, synthetic=synthetic_params, hint=hint, digest=digest)
    bundle = build_bundle(
        raw, val_per_class=0, split_seed=0, train_subset=None, stats_subset=1, heldout_subset=None, device=device
    )
    return bundle.test, raw


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip for a whole uint8 batch at once."""
    n, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=generator.device).to(dev)
    flips = torch.rand(n, generator=generator, device=generator.device).to(dev) < 0.5
    rows = offsets[:, 0, None] + torch.arange(h, device=dev)  # [n, h]
    cols = offsets[:, 1, None] + torch.arange(w, device=dev)  # [n, w]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def to_float(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    x = images.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def iterate_batches(n: int, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False):
    """Index batches over range(n); shuffled when a generator is given (the loop owns its RNG).

    The shuffled order stays on the generator's device, so a GPU loop never copies indices
    from the host (a blocking transfer per step)."""
    if generator is not None:
        order = torch.randperm(n, generator=generator, device=generator.device)
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
