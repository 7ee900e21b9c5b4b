"""Data layouts, caching, splits and batched augmentation."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from robustlogits.core import data
from robustlogits.core.errors import UserError


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def write_cifar10_pickles(root, per_batch: int = 20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_x, all_y = [], []
    for i in range(1, 6):
        x, y = _images(per_batch, i), np.arange(per_batch) % 10
        all_x.append(x), all_y.append(y)
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": x.reshape(per_batch, -1), b"labels": y.tolist()}, fh)
    tx, ty = _images(30, 9), (np.arange(30) * 7) % 10
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": tx.reshape(30, -1), b"labels": ty.tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [c.encode() for c in data.CIFAR10_CLASSES]}, fh)
    return np.concatenate(all_x), np.concatenate(all_y), tx, ty


def write_cifar100_pickles(root):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    x, y = _images(200, 1), np.arange(200) % 100
    tx, ty = _images(100, 2), np.arange(100)[::-1].copy()
    for name, (a, b) in {"train": (x, y), "test": (tx, ty)}.items():
        with open(folder / name, "wb") as fh:
            pickle.dump(
                {b"data": a.reshape(len(a), -1), b"fine_labels": b.tolist(), b"coarse_labels": (b // 5).tolist()}, fh
            )
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"c{i:03d}".encode() for i in range(100)]}, fh)
    return x, y, tx, ty


def write_png(chw: np.ndarray, path) -> None:
    Image.fromarray(chw.transpose(1, 2, 0)).save(path)


def write_image_folder(root, per_class=(3, 2), classes=data.CIFAR10_CLASSES):
    """PNG (lossless) so decoded pixels can be compared exactly."""
    expected = {}
    for split, n in zip(("train", "test"), per_class):
        xs, ys = [], []
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j in range(n):
                img = _images(1, hash((split, label, j)) % 1000)[0]
                write_png(img, root / split / name / f"{j:04d}.png")
                xs.append(img), ys.append(label)
        expected[split] = (np.stack(xs), np.array(ys))
    return expected


def test_cifar10_pickle_layout_loads_with_shapes_and_labels(tmp_path):
    x, y, tx, ty = write_cifar10_pickles(tmp_path / "d")
    raw = data.load_raw("cifar10", tmp_path / "d")
    assert raw.train_images.shape == (100, 3, 32, 32) and raw.train_images.dtype == np.uint8
    np.testing.assert_array_equal(raw.train_images, x)
    np.testing.assert_array_equal(raw.train_labels, y)
    np.testing.assert_array_equal(raw.test_images, tx)
    np.testing.assert_array_equal(raw.test_labels, ty)
    assert raw.classes == data.CIFAR10_CLASSES and raw.source.startswith("pickle:")


def test_cifar100_pickle_layout_uses_fine_labels(tmp_path):
    x, y, tx, ty = write_cifar100_pickles(tmp_path)
    raw = data.load_raw("cifar100", tmp_path)
    assert raw.num_classes == 100
    np.testing.assert_array_equal(raw.train_labels, y)
    np.testing.assert_array_equal(raw.test_images, tx)


def test_image_folder_layout_labels_follow_sorted_class_names(tmp_path):
    expected = write_image_folder(tmp_path / "imgs")
    raw = data.load_raw("cifar10", tmp_path / "imgs")
    assert raw.classes == tuple(sorted(data.CIFAR10_CLASSES))
    np.testing.assert_array_equal(raw.train_images, expected["train"][0])
    np.testing.assert_array_equal(raw.train_labels, expected["train"][1])
    np.testing.assert_array_equal(raw.test_labels, expected["test"][1])
    assert raw.source.startswith("imagefolder:")


def test_pickle_layout_wins_over_image_folder(tmp_path):
    write_cifar10_pickles(tmp_path)
    write_image_folder(tmp_path)
    assert data.load_raw("cifar10", tmp_path).source.startswith("pickle:")


def test_tar_archive_is_extracted_and_loaded(tmp_path):
    write_image_folder(tmp_path / "src")
    archive = tmp_path / "dl" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "train", arcname="train")
        tar.add(tmp_path / "src" / "test", arcname="test")
    raw = data.load_raw("cifar10", archive.parent)
    assert raw.train_images.shape == (30, 3, 32, 32)


def test_cache_is_used_and_never_stale(tmp_path, monkeypatch):
    expected = write_image_folder(tmp_path / "imgs")
    first = data.load_raw("cifar10", tmp_path / "imgs")
    monkeypatch.setattr(data, "_decode_image_folder", lambda *a: pytest.fail("cache was not used"))
    again = data.load_raw("cifar10", tmp_path / "imgs")
    assert again.digest == first.digest
    monkeypatch.undo()
    # Change one source image: the cache key changes and the new pixels are served.
    target = tmp_path / "imgs" / "train" / sorted(data.CIFAR10_CLASSES)[0] / "0000.png"
    write_png(np.zeros((3, 32, 32), dtype=np.uint8), target)
    changed = data.load_raw("cifar10", tmp_path / "imgs")
    assert changed.digest != first.digest
    assert changed.train_images[0].max() == 0 and expected["train"][0][0].max() > 0


def test_cache_is_keyed_on_content_and_says_what_it_does(tmp_path, monkeypatch, caplog):
    import logging
    import os
    import shutil

    write_image_folder(tmp_path / "src")
    archive = tmp_path / "a" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "train", arcname="train")
        tar.add(tmp_path / "src" / "test", arcname="test")
    with caplog.at_level(logging.INFO, logger="robustlogits"):
        first = data.load_raw("cifar10", archive.parent)
    said = caplog.text
    assert "extracting" in said and "decoding 30+20 files" not in said and "decoding 50 files" in said
    assert "100% (50/50 file)" in said  # no terminal here: a line every 10% instead of a bar
    # A copy of the same archive elsewhere, with a new mtime: neither extracted nor decoded again.
    copy = tmp_path / "b" / "cifar10-jpeg.tar.gz"
    copy.parent.mkdir()
    shutil.copyfile(archive, copy)
    os.utime(copy, (1e9, 1e9))
    caplog.clear()
    monkeypatch.setattr(data, "_decode_image_folder", lambda *a: pytest.fail("decoded again"))
    with caplog.at_level(logging.INFO, logger="robustlogits"):
        again = data.load_raw("cifar10", copy.parent)
    assert again.digest == first.digest
    assert "using the decoded cache" in caplog.text and "extracting" not in caplog.text
    assert len(list((data.cache_root() / "arrays").glob("*.npz"))) == 1


def test_corrupt_image_names_the_file(tmp_path):
    write_image_folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "test" / "bird" / "0001.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="corrupt image .*0001.png"):
        data.load_raw("cifar10", tmp_path / "imgs")


def test_corrupt_pickle_is_a_clear_error(tmp_path):
    write_cifar10_pickles(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80garbage")
    with pytest.raises(UserError, match="corrupt dataset file .*data_batch_3"):
        data.load_raw("cifar10", tmp_path)


def test_missing_data_says_what_was_looked_for(tmp_path):
    with pytest.raises(UserError) as err:
        data.load_raw("cifar100", tmp_path / "nowhere")
    message = str(err.value)
    assert "cifar-100-python" in message and "train/<class>" in message and "--data-dir" in message


def test_default_search_uses_env_then_local_and_shared_folders(tmp_path, monkeypatch):
    write_cifar10_pickles(tmp_path / "shared" / "data")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.delenv("ROBUSTLOGITS_DATA", raising=False)
    assert data.load_raw("cifar10").train_images.shape == (100, 3, 32, 32)  # found in ../shared/data
    monkeypatch.setenv("ROBUSTLOGITS_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match="elsewhere"):
        data.load_raw("cifar10")


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        data.load_raw("mnist")


def test_validation_split_sizes_are_per_class_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 50)
    train, val = data.split_validation(labels, 5, seed=3)
    assert len(val) == 50 and len(train) == 450
    assert np.all(np.bincount(labels[val]) == 5)
    assert not set(train) & set(val)
    again_train, again_val = data.split_validation(labels, 5, seed=3)
    np.testing.assert_array_equal(val, again_val)
    assert not np.array_equal(val, data.split_validation(labels, 5, seed=4)[1])


def test_bundle_splits_cifar10_and_uses_test_as_heldout_without_validation():
    raw = data.make_synthetic(train_per_class=20, test_per_class=4)
    with_val = data.build_bundle(
        raw,
        val_per_class=5,
        split_seed=0,
        train_subset=None,
        stats_subset=30,
        heldout_subset=None,
        device=torch.device("cpu"),
    )
    assert (len(with_val.train), len(with_val.heldout), len(with_val.test)) == (150, 50, 40)
    assert with_val.heldout.name == "val" and len(with_val.stats) == 30
    assert set(with_val.stats.indices) <= set(with_val.train.indices)
    no_val = data.build_bundle(
        raw,
        val_per_class=0,
        split_seed=0,
        train_subset=60,
        stats_subset=30,
        heldout_subset=None,
        device=torch.device("cpu"),
    )
    assert no_val.heldout.name == "test" and len(no_val.train) == 60
    assert np.all(np.bincount(no_val.train.labels.numpy()) == 6)  # stratified subset


def test_stratified_indices_keep_proportions_and_reject_bad_sizes():
    labels = np.array([0] * 70 + [1] * 30)
    idx = data.stratified_indices(labels, 10, seed=0)
    assert np.bincount(labels[idx]).tolist() == [7, 3]
    with pytest.raises(UserError):
        data.stratified_indices(labels, 0, seed=0)
    with pytest.raises(UserError):
        data.stratified_indices(labels, 101, seed=0)


def test_augmentation_keeps_shape_is_seeded_and_is_a_padded_crop_or_flip():
    images = torch.from_numpy(_images(32, 0))
    out = data.augment(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    np.testing.assert_array_equal(out, data.augment(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, data.augment(images, torch.Generator().manual_seed(2)))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flipped = 0
    for i in range(len(images)):
        candidates = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy : dy + 32, dx : dx + 32]))
        ]
        assert candidates, f"image {i} is not a crop of its padded original"
        flipped += all(f for _, _, f in candidates)
    assert 6 < flipped < 26  # about half flipped


def test_float_conversion_range():
    x = data.to_float(torch.tensor([[[[0, 255]]]], dtype=torch.uint8).expand(1, 3, 1, 2))
    assert x.min() == 0.0 and x.max() == 1.0


def test_synthetic_is_deterministic_and_class_conditional():
    a, b = data.make_synthetic(8, 2), data.make_synthetic(8, 2)
    assert a.digest == b.digest and a.train_images.shape == (80, 3, 32, 32)
    means = np.stack([a.train_images[a.train_labels == c].mean(0) for c in range(10)])
    assert np.abs(means[0] - means[1]).mean() > 10  # classes differ in their images


@pytest.mark.realdata
def test_real_cifar10_loads_with_paper_split(real_cifar10_dir, real_data_cache, monkeypatch):
    monkeypatch.setenv("ROBUSTLOGITS_CACHE", str(real_data_cache))
    raw = data.load_raw("cifar10", real_cifar10_dir)
    assert raw.train_images.shape == (50000, 3, 32, 32) and raw.test_images.shape == (10000, 3, 32, 32)
    assert raw.classes == data.CIFAR10_CLASSES
    assert np.all(np.bincount(raw.train_labels) == 5000)
    bundle = data.build_bundle(
        raw,
        val_per_class=500,
        split_seed=0,
        train_subset=None,
        stats_subset=2000,
        heldout_subset=None,
        device=torch.device("cpu"),
    )
    assert (len(bundle.train), len(bundle.heldout), len(bundle.test)) == (45000, 5000, 10000)


def test_concurrent_first_extraction_keeps_the_folder_the_other_process_reads(tmp_path, monkeypatch):
    """Two workers extracting the same archive at once: the one that finishes second must not
    delete the folder the first is already decoding from (it did: 'corrupt image ... No such file')."""
    import tarfile

    from robustlogits.core import data

    src = tmp_path / "src" / "train" / "cat"
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"{i}.txt").write_text(str(i))
    archive = tmp_path / "toy.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "train", arcname="train")
    original = tarfile.TarFile.extract
    state = {"nested": False, "first_target": None}

    def extract_while_another_process_finishes(self, *args, **kwargs):
        if not state["nested"]:
            state["nested"] = True  # the other worker runs start to finish now, inside our extraction
            state["first_target"] = data._extract_archive(archive)
            state["inode"] = (state["first_target"] / "train" / "cat" / "0.txt").stat().st_ino
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", extract_while_another_process_finishes)
    target = data._extract_archive(archive)
    assert target == state["first_target"]
    # The other worker's files are still there, untouched (same inode), and no temp folder is left.
    assert (target / "train" / "cat" / "0.txt").stat().st_ino == state["inode"]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
