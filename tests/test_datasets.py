"""Dataset sources on tiny files written here in the real on-disk formats, read through the
real loaders (load_dataset), plus the `data` commands and bad-input errors through the CLI."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from oodbench.datasets.base import DatasetRef, load_dataset
from oodbench.datasets.cifar import CIFAR10_CLASSES
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import DatasetMissing, OodbenchError

RGB32 = ImageSpec(32, 3)
GREY28 = ImageSpec(28, 1)


def load(root: Path, dataset: str, image: ImageSpec = RGB32, ood: bool = False, **options):
    return load_dataset(DatasetRef(dataset, options), root, image, ood=ood)


def all_items(dataset) -> tuple[torch.Tensor, np.ndarray]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), np.asarray(labels)


# --------------------------------------------------------------------------- writers


def random_images(count: int, seed: int, shape=(32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def write_cifar_batch(path: Path, images: np.ndarray, labels, label_key: str = "labels") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {"batch_label": "testing batch 1 of 1", label_key: list(labels),
             "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), "filenames": [f"{i}.png" for i in range(len(images))]}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def write_png_folder(folder: Path, images: np.ndarray, labels, classes, suffix: str = ".png") -> list[Path]:
    paths = []
    for index, (array, label) in enumerate(zip(images, labels)):
        path = folder / classes[label] / f"{index:04d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, compress: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    content = idx_bytes(array, type_code)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)
    return path


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_pickle_is_read_pixel_exact_without_md5(tmp_path):
    images, labels = random_images(12, 0), np.arange(12) % 10
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", images, labels)
    dataset = load(tmp_path, "cifar10", format="pickle")
    tensors, got = all_items(dataset)
    assert tensors.shape == (12, 3, 32, 32)
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_allclose(tensors.numpy(), images.transpose(0, 3, 1, 2) / 255.0, atol=1e-7)


def test_cifar100_pickle_uses_fine_labels_and_train_batches(tmp_path):
    images = random_images(6, 1)
    write_cifar_batch(tmp_path / "cifar-100-python" / "train", images, [99, 0, 5, 7, 42, 3], "fine_labels")
    with pytest.warns(UserWarning, match="holds only 6 of the 50000 CIFAR-100 train images"):
        _, labels = all_items(load(tmp_path, "cifar100", split="train"))
    np.testing.assert_array_equal(labels, [99, 0, 5, 7, 42, 3])


def test_cifar10_train_concatenates_the_five_batches(tmp_path):
    for number in range(1, 6):
        write_cifar_batch(tmp_path / "cifar-10-batches-py" / f"data_batch_{number}", random_images(2, number),
                          [number, number])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, labels = all_items(load(tmp_path, "cifar10", split="train"))
    np.testing.assert_array_equal(labels, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    assert any("holds only 10 of the 50000" in str(w.message) for w in caught)


def test_cifar_folder_uses_the_official_class_order(tmp_path):
    images, labels = random_images(10, 2), np.arange(10)[::-1]
    write_png_folder(tmp_path / "cifar10" / "test", images, labels, CIFAR10_CLASSES)
    tensors, got = all_items(load(tmp_path, "cifar10"))
    # sorted path order: airplane/0009.png first (label 0), truck/0000.png last
    np.testing.assert_array_equal(got, np.arange(10))
    np.testing.assert_allclose(tensors[0].numpy(), images[9].transpose(2, 0, 1) / 255.0, atol=1e-7)


def test_cifar_auto_prefers_a_complete_folder_over_a_partial_pickle(tmp_path):
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", random_images(3, 3), [0, 1, 2])
    write_png_folder(tmp_path / "cifar10" / "test", random_images(5, 4), [0, 1, 2, 3, 4], CIFAR10_CLASSES)
    with pytest.warns(UserWarning, match="holds 3 of the 10000 CIFAR-10 test images; reading"):
        assert len(load(tmp_path, "cifar10")) == 5
    assert len(load(tmp_path, "cifar10", format="pickle")) == 3


def test_cifar_folder_with_an_unknown_class_is_an_error(tmp_path):
    write_png_folder(tmp_path / "cifar10" / "test", random_images(1, 5), [0], ["zebra"])
    with pytest.raises(OodbenchError, match="subfolder 'zebra' is not one of the 10 expected classes"):
        load(tmp_path, "cifar10")


def test_truncated_cifar_pickle_names_the_file(tmp_path):
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_cifar_batch(path, random_images(4, 6), [0, 1, 2, 3])
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(OodbenchError, match=r"test_batch \(truncated\); expected a CIFAR python-pickle batch"):
        load(tmp_path, "cifar10")


def test_absent_cifar_is_dataset_missing_with_both_layouts_and_the_fetch_command(tmp_path):
    with pytest.raises(DatasetMissing) as info:
        load(tmp_path, "cifar100")
    message = str(info.value)
    assert "cifar-100-python/test" in message and "cifar100/test/<class>/" in message
    assert "oodbench data fetch cifar100" in message


# --------------------------------------------------------------------------- MNIST family


def test_mnist_idx_gz_and_plain_idx(tmp_path):
    images = random_images(7, 7, (28, 28))
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    write_idx(tmp_path / "MNIST/raw/t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte", labels, compress=False)
    tensors, got = all_items(load(tmp_path, "mnist", GREY28))
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_allclose(tensors[:, 0].numpy(), images / 255.0, atol=1e-7)


def test_mnist_grey_to_rgb_and_28_to_32_bilinear(tmp_path):
    images = random_images(2, 8, (28, 28))
    write_idx(tmp_path / "KMNIST/raw/t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "KMNIST/raw/t10k-labels-idx1-ubyte", np.array([0, 1], np.uint8))
    tensors, labels = all_items(load(tmp_path, "kmnist", RGB32, ood=True))
    assert tensors.shape == (2, 3, 32, 32) and list(labels) == [-1, -1]
    assert torch.equal(tensors[:, 0], tensors[:, 2])
    from torch.nn.functional import interpolate

    expected = interpolate(torch.from_numpy(images).float().div(255)[:, None], size=32, mode="bilinear",
                           align_corners=False)
    torch.testing.assert_close(tensors[:, :1], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode, source_size, size", [
    ("RGB", (64, 64), 32),  # Tiny ImageNet -> CIFAR: downscale
    ("L", (28, 28), 32),  # MNIST -> CIFAR: grey, upscale
    ("RGB", (500, 375), 32),  # a photograph, landscape: resize the short side, crop the long one
    ("L", (333, 517), 224),  # portrait, odd sizes, upscale the crop's short side
    ("RGB", (31, 97), 32),  # upscale one side, crop the other
])
def test_decoding_equals_torchvision_resize_center_crop_to_tensor_bit_for_bit(mode, source_size, size):
    """to_image_tensor does without torchvision (seconds of import per process) and gives
    exactly its test transform: PIL images, and the same pixels as arrays and tensors."""
    from torchvision.transforms import functional as TF

    from oodbench.datasets.transform import to_image_tensor

    rng = np.random.default_rng(source_size[0])
    shape = source_size[::-1] + ((3,) if mode == "RGB" else ())
    picture = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    for channels in (3, 1):
        converted = picture.convert("RGB" if channels == 3 else "L")
        expected = TF.to_tensor(TF.center_crop(TF.resize(converted, size, interpolation=TF.InterpolationMode.BILINEAR),
                                               [size, size]))
        got = to_image_tensor(picture, ImageSpec(size, channels))
        assert got.shape == (channels, size, size) and torch.equal(got, expected), (channels, mode)
    pixels = TF.to_tensor(picture)
    for item in (pixels, np.asarray(picture)):  # tensors and arrays: torch's antialiased bilinear
        expected = TF.center_crop(TF.resize(pixels, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True),
                                  [size, size])
        got = to_image_tensor(item, ImageSpec(size, pixels.shape[0]))
        assert torch.equal(got, expected), type(item)


def stratified_reference(labels: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Stratified parts written out on NumPy arrays: each sample, grouped by label, goes to the
    part furthest behind its share (the first on ties, full parts never)."""
    n = labels.size
    order = np.random.default_rng(seed).permutation(n)
    by_label = order[np.argsort(labels[order], kind="stable")]
    targets = np.array(sizes + [n - sum(sizes)], dtype=np.float64)
    filled = np.zeros(len(targets))
    chosen = []
    for position in range(n):
        behind = targets * (position + 1) / n - filled
        behind[filled >= targets] = -np.inf
        chosen.append(int(np.argmax(behind)))
        filled[chosen[-1]] += 1
    chosen = np.array(chosen)
    return [np.sort(by_label[chosen == part]) for part in range(len(sizes))]


@pytest.mark.parametrize("n, classes, sizes, seed", [(10000, 10, [1000], 0), (997, 7, [100, 300], 3),
                                                     (50, 3, [0, 49], 1), (1, 1, [1], 0), (2000, 200, [1000, 1000], 5)])
def test_stratified_parts_equal_the_numpy_reference(n, classes, sizes, seed):
    """The parts (and so every selection and its fingerprint) stay exactly what they were."""
    from oodbench.datasets.parts import stratified_parts

    labels = np.random.default_rng(n).integers(0, classes, n)
    got = stratified_parts(labels, {f"part{i}": size for i, size in enumerate(sizes)}, seed)
    for part, expected in zip(got.values(), stratified_reference(labels, sizes, seed)):
        np.testing.assert_array_equal(part, expected)


def test_mnist_split_all_is_train_then_test(tmp_path):
    for prefix, count in (("train", 3), ("t10k", 2)):
        write_idx(tmp_path / f"FashionMNIST/raw/{prefix}-images-idx3-ubyte", random_images(count, count, (28, 28)))
        write_idx(tmp_path / f"FashionMNIST/raw/{prefix}-labels-idx1-ubyte", np.full(count, count, np.uint8))
    _, labels = all_items(load(tmp_path, "fashion_mnist", GREY28, split="all"))
    np.testing.assert_array_equal(labels, [3, 3, 3, 2, 2])


def test_emnist_letters_are_turned_upright(tmp_path):
    stored = np.zeros((1, 28, 28), np.uint8)
    stored[0, 0, 5] = 255  # EMNIST stores images transposed: upright pixel (5, 0)
    write_idx(tmp_path / "EMNIST/raw/emnist-letters-test-images-idx3-ubyte", stored)
    write_idx(tmp_path / "EMNIST/raw/emnist-letters-test-labels-idx1-ubyte", np.array([26], np.uint8))
    tensors, labels = all_items(load(tmp_path, "emnist", GREY28))
    assert labels.tolist() == [26]
    assert tensors[0, 0, 5, 0] == 1.0 and tensors[0, 0, 0, 5] == 0.0


def test_qmnist_test50k_reads_idx2_int_labels_after_the_first_10000(tmp_path):
    count = 10003
    images = np.zeros((count, 28, 28), np.uint8)
    images[10000:, 0, 0] = [10, 20, 30]
    labels = np.zeros((count, 8), np.int32)
    labels[:, 0] = np.arange(count) % 10
    labels[:, 2] = 12345  # writer id column, ignored
    write_idx(tmp_path / "QMNIST/raw/qmnist-test-images-idx3-ubyte", images)
    write_idx(tmp_path / "QMNIST/raw/qmnist-test-labels-idx2-int", labels, type_code=0x0C)
    dataset = load(tmp_path, "qmnist", GREY28)
    tensors, got = all_items(dataset)
    np.testing.assert_array_equal(got, [0, 1, 2])
    np.testing.assert_allclose(tensors[:, 0, 0, 0].numpy(), np.array([10, 20, 30]) / 255.0, atol=1e-7)


def test_idx_with_a_wrong_magic_number_names_the_file(tmp_path):
    write_idx(tmp_path / "MNIST/raw/t10k-images-idx3-ubyte", random_images(2, 9, (28, 28)))
    write_idx(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte", random_images(2, 9, (28, 28)))  # 3-d, not labels
    with pytest.raises(OodbenchError, match=r"t10k-labels-idx1-ubyte.gz has magic number 0x00000803; expected an "
                                            r"idx file with a 1-dimensional uint8 array \(magic number 0x00000801\)"):
        load(tmp_path, "mnist", GREY28)


def test_truncated_idx_names_the_file(tmp_path):
    path = write_idx(tmp_path / "MNIST/raw/t10k-images-idx3-ubyte", random_images(3, 10, (28, 28)), compress=False)
    path.write_bytes(path.read_bytes()[:-100])
    write_idx(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(OodbenchError, match="t10k-images-idx3-ubyte holds 2252 data bytes, its header says"):
        load(tmp_path, "mnist", GREY28)


# --------------------------------------------------------------------------- SVHN


def test_svhn_mat_maps_label_10_to_0(tmp_path):
    import scipy.io

    images = random_images(4, 11)
    (tmp_path / "SVHN").mkdir()
    scipy.io.savemat(tmp_path / "SVHN" / "test_32x32.mat",
                     {"X": images.transpose(1, 2, 3, 0), "y": np.array([[10], [1], [9], [10]], np.uint8)})
    tensors, labels = all_items(load(tmp_path, "svhn"))
    np.testing.assert_array_equal(labels, [0, 1, 9, 0])
    np.testing.assert_allclose(tensors.numpy(), images.transpose(0, 3, 1, 2) / 255.0, atol=1e-7)


def test_svhn_class_folders(tmp_path):
    write_png_folder(tmp_path / "svhn" / "test", random_images(3, 12), [7, 0, 3], [str(d) for d in range(10)])
    _, labels = all_items(load(tmp_path, "svhn"))
    np.testing.assert_array_equal(labels, [0, 3, 7])


def test_corrupt_svhn_mat_names_the_file(tmp_path):
    (tmp_path / "SVHN").mkdir()
    (tmp_path / "SVHN" / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, not really" + bytes(20))
    with pytest.raises(OodbenchError, match="cannot read .*test_32x32.mat .*expected a MATLAB file with 'X'"):
        load(tmp_path, "svhn")


# --------------------------------------------------------------------------- image lists and folders


def write_openood(root: Path, count: int = 4) -> tuple[np.ndarray, Path]:
    images = random_images(count, 13)
    lines = []
    for index, array in enumerate(images):
        relative = f"tin/test/img_{index}.png"
        (root / "images_classic" / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / "images_classic" / relative)
        lines.append(f"{relative} -1")
    listing = root / "benchmark_imglist" / "cifar10" / "test_tin.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text("\n".join(lines) + "\n")
    return images, listing


def test_openood_image_list(tmp_path):
    images, _ = write_openood(tmp_path)
    dataset = load(tmp_path, "imglist", list="benchmark_imglist/cifar10/test_tin.txt")
    tensors, labels = all_items(dataset)
    assert labels.tolist() == [-1] * 4
    np.testing.assert_allclose(tensors.numpy(), images.transpose(0, 3, 1, 2) / 255.0, atol=1e-7)


def test_image_list_naming_a_missing_image(tmp_path):
    _, listing = write_openood(tmp_path)
    (tmp_path / "images_classic" / "tin" / "test" / "img_2.png").unlink()
    with pytest.raises(OodbenchError, match=r"test_tin.txt line 3 names .*img_2.png, which does not exist"):
        load(tmp_path, "imglist", list="benchmark_imglist/cifar10/test_tin.txt")


def test_image_list_with_a_malformed_line(tmp_path):
    _, listing = write_openood(tmp_path)
    listing.write_text("tin/test/img_0.png -1\ntin/test/img_1.png\n")
    with pytest.raises(OodbenchError, match=r"test_tin.txt line 2: expected 'relative/path label'"):
        load(tmp_path, "imglist", list="benchmark_imglist/cifar10/test_tin.txt")


def test_flat_image_folder_sorted_with_limit_and_upscaled(tmp_path):
    folder = tmp_path / "odin" / "LSUN_resize"
    folder.mkdir(parents=True)
    small = random_images(3, 14, (16, 16, 3))
    for name, array in zip(["b.jpg", "a.png", "c.png"], small):
        Image.fromarray(array).save(folder / name)
    dataset = load(tmp_path, "image_folder", path="odin/LSUN_resize", limit=2)
    tensors, labels = all_items(dataset)
    assert tensors.shape == (2, 3, 32, 32) and labels.tolist() == [0, 0]
    from torchvision.transforms import functional as TF

    # a.png comes first in sorted order; resized in PIL before ToTensor, as torchvision's
    # Resize on PIL images (OpenOOD's test transform) does
    expected = TF.to_tensor(TF.resize(Image.fromarray(small[1]), 32, interpolation=TF.InterpolationMode.BILINEAR))
    torch.testing.assert_close(tensors[0], expected)


def test_a_selection_of_image_files_is_named_by_the_listing_and_its_own_files(tmp_path):
    """A part or a limit reads only its files: their size and mtime (or content) are in its
    fingerprint, the other files only by name (the selection's indices refer to the listing);
    so a run on 1,000 of 10,000 images stats 1,000."""
    import os

    from oodbench.datasets.base import split_fingerprint_of
    from oodbench.file_state import FileState

    folder = tmp_path / "photos"
    paths = write_png_folder(folder, random_images(8, 3), [0, 1] * 4, ["cat", "dog"])
    ref = DatasetRef("image_folder", {"path": "photos"}, parts={"val": 2, "test": "rest"}, part="val")

    def fingerprint() -> tuple[str, list[str]]:
        dataset = load_dataset(ref, tmp_path, RGB32)
        files = FileState(tmp_path)
        return split_fingerprint_of(dataset, ref, False, files), [p.name for p in dataset.base.base.paths]

    before, listing = fingerprint()
    chosen = {listing[i] for i in load_dataset(ref, tmp_path, RGB32).base.indices}
    other = next(p for p in paths if p.name not in chosen)
    picked = next(p for p in paths if p.name in chosen)
    os.utime(other, ns=(1, 1))
    assert fingerprint()[0] == before  # an image the part does not read
    os.utime(picked, ns=(2, 2))
    changed = fingerprint()[0]
    assert changed != before  # an image it reads
    Image.fromarray(random_images(1, 4)[0]).save(folder / "cat" / "zzzz.png")
    assert fingerprint()[0] != changed  # the listing its indices refer to


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    """Jupyter's .ipynb_checkpoints/ beside class folders, and macOS's ._ files beside images:
    skipped, so the classes are cats 0 and dogs 1 (issue 23, item 1)."""
    images = random_images(4, 21)
    write_png_folder(tmp_path / "mine", images, [0, 1, 0, 1], ["cats", "dogs"])
    write_png_folder(tmp_path / "mine", random_images(1, 22), [0], [".ipynb_checkpoints"])
    (tmp_path / "mine" / "cats" / "._0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
    (tmp_path / "mine" / ".hidden.png").write_bytes(b"not a PNG either")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty-class warning either
        dataset = load(tmp_path, "image_folder", path="mine")
        tensors, labels = all_items(dataset)
    assert labels.tolist() == [0, 0, 1, 1] and tensors.shape[0] == 4
    assert [p.relative_to(tmp_path / "mine").as_posix() for p in dataset.base.paths] == [
        "cats/0000.png", "cats/0002.png", "dogs/0001.png", "dogs/0003.png"]


def test_an_empty_class_folder_keeps_its_index_and_is_named_in_one_warning(tmp_path):
    """birds/ (empty) sorts before cats/ and dogs/: cats stay 1 and dogs 2, as torchvision's
    ImageFolder numbers them, and one warning line names the empty folder."""
    write_png_folder(tmp_path / "mine", random_images(4, 23), [1, 2, 1, 2], ["birds", "cats", "dogs"])
    (tmp_path / "mine" / "birds").mkdir()
    with pytest.warns(UserWarning) as caught:
        labels = all_items(load(tmp_path, "image_folder", path="mine"))[1]
    assert labels.tolist() == [1, 1, 2, 2]
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and "1 of the 3 class folders hold no images (birds)" in lines[0], lines
    assert "\n" not in lines[0]


def test_a_large_set_is_named_by_a_seeded_sample_of_contents_hashed_once(tmp_path, monkeypatch):
    """Beyond `SAMPLE_FILES` files (and `WHOLE_SET_BYTES`), a seeded sample of the files is read:
    a copy of the folder with equal names, sizes and times but other bytes in a sampled file is
    another set; the sample is read once per root (the state cache), and a plain run names the
    files as before (stat) (issue 23, item 4)."""
    import shutil

    from oodbench import file_state as identity

    monkeypatch.setattr(identity, "SAMPLE_FILES", 5)
    monkeypatch.setattr(identity, "WHOLE_SET_BYTES", 0)
    read: list[str] = []
    hash_file = identity._sha256_of
    monkeypatch.setattr(identity, "_sha256_of", lambda path: read.append(str(path)) or hash_file(path))
    root_a = tmp_path / "A"
    (root_a / "set").mkdir(parents=True)
    for index in range(40):
        (root_a / "set" / f"{index:02d}.bin").write_bytes(bytes([index]) * 64)
    paths_a = sorted((root_a / "set").iterdir())

    def describe(root: Path) -> str:
        files = identity.FileState(root, tmp_path / "state")
        try:
            return files.describe(sorted((root / "set").iterdir()))
        finally:
            files.close()

    first = describe(root_a)
    sampled = sorted(read)
    assert len(sampled) == 5 and sampled != [str(p) for p in paths_a[:5]], "a seeded sample, not the first five"
    read.clear()
    assert describe(root_a) == first and read == [], "remembered by (path, size, mtime, inode)"

    root_b = tmp_path / "B"
    shutil.copytree(root_a, root_b)  # copy2: the same names, sizes and modification times
    assert describe(root_b) == first and len(read) == 5
    for changed, expect_other in ((next(p for p in paths_a if str(p) not in sampled), False), (Path(sampled[2]), True)):
        target = root_b / changed.relative_to(root_a)
        stat = target.stat()
        target.write_bytes(bytes([255]) * 64)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        shutil.rmtree(tmp_path / "state")  # as a root unpacked anew: no hash remembered for it
        assert (describe(root_b) != first) == expect_other  # an unsampled file is the limit of a sample


def test_unreadable_image_names_the_file(tmp_path):
    folder = tmp_path / "textures" / "banded"
    folder.mkdir(parents=True)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    dataset = load(tmp_path, "image_folder", path="textures")
    with pytest.raises(OodbenchError, match=r"cannot decode image .*broken.jpg .*expected a readable PNG/JPEG"):
        dataset[0]


def test_tiny_imagenet_val_layout_with_a_greyscale_image(tmp_path):
    base = tmp_path / "tin"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("n02\nn01\n")
    colour = random_images(1, 15, (64, 64, 3))[0]
    Image.fromarray(colour).save(base / "val" / "images" / "val_0.JPEG", quality=95)
    Image.fromarray(colour[:, :, 0]).save(base / "val" / "images" / "val_1.JPEG", quality=95)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\nval_1.JPEG\tn01\t1\t1\t9\t9\n")
    tensors, labels = all_items(load(tmp_path, "tiny_imagenet"))
    assert labels.tolist() == [1, 0]  # indices into the sorted wnids
    assert tensors.shape == (2, 3, 32, 32)
    assert torch.equal(tensors[1, 0], tensors[1, 1]) and torch.equal(tensors[1, 1], tensors[1, 2])


def test_any_of_falls_back_and_applies_the_candidates_part(tmp_path):
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", random_images(20, 16), np.arange(20) % 10)
    candidates = [{"dataset": "imglist", "options": {"list": "benchmark_imglist/cifar10/test_cifar10.txt"}},
                  {"dataset": "cifar10", "options": {"format": "pickle"}, "parts": {"val": 10, "test": "rest"},
                   "part": "val"}]
    dataset = load(tmp_path, "any_of", candidates=candidates)
    _, labels = all_items(dataset)
    assert len(dataset) == 10 and sorted(labels.tolist()) == list(range(10))  # stratified: one per class
    from oodbench.benchmark.plan import fallback_of

    assert fallback_of(dataset) == "cifar10 (candidate 2 of 2)"  # stored with the results (reference notes)
    assert fallback_of(load(tmp_path, "any_of", candidates=candidates[1:])) == ""  # a first choice
    with pytest.raises(DatasetMissing, match="OpenOOD image list not found.*| or: CIFAR-100"):
        load(tmp_path, "any_of", candidates=[candidates[0], {"dataset": "cifar100"}])


# --------------------------------------------------------------------------- the benchmarks and the CLI


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist"])
def test_shipped_benchmarks_parse_with_version_and_openood_groups(name):
    from oodbench.datasets.benchmarks import load_benchmark

    bench = load_benchmark(name)
    assert bench.version == 1 and set(bench.id_splits) == {"train", "val", "test"}
    expected = {"cifar10": (["cifar100", "tin"], ["mnist", "svhn", "textures", "places365"]),
                "cifar100": (["cifar10", "tin"], ["mnist", "svhn", "textures", "places365"]),
                "mnist": (["kmnist", "emnist_letters", "qmnist_shift"], ["fashion_mnist", "gaussian", "uniform"])}
    assert (list(bench.near), list(bench.far)) == expected[name]


def test_data_status_lists_present_and_missing_with_counts(tmp_path, run_cli):
    root = tmp_path / "data"
    write_idx(root / "MNIST/raw/t10k-images-idx3-ubyte", random_images(1200, 17, (28, 28)))
    write_idx(root / "MNIST/raw/t10k-labels-idx1-ubyte", (np.arange(1200) % 10).astype(np.uint8))
    result = run_cli("data", "status", "mnist", "--data-root", root)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line[:1].isalpha() and ":" in line.split()[0]}
    assert rows["id:val"][2:4] == ["present", "1,000"]
    assert rows["id:test"][2:4] == ["present", "200"]
    assert rows["near:kmnist"][2:4] == ["missing", "-"] and "oodbench data fetch kmnist" in result.stdout
    assert rows["far:gaussian"][2:4] == ["present", "10,000"]
    assert "4 of 10 present" in result.stdout


def test_data_fetch_prints_instructions_for_what_torchvision_cannot_download(tmp_path, run_cli):
    result = run_cli("data", "fetch", "tin", "--data-root", tmp_path / "d")
    assert result.returncode == 0
    assert "tiny-imagenet-200.zip" in result.stdout and str(tmp_path / "d" / "tin") in result.stdout
    result = run_cli("data", "fetch", "cifar1O", "--data-root", tmp_path / "d")
    assert result.returncode == 2 and "did you mean: cifar10" in result.stderr
    assert not (tmp_path / "d").exists()


def tiny_benchmark(tmp_path: Path, id_test: dict, far: dict | None = None) -> Path:
    bench = {"name": "tiny", "version": 1, "image": {"size": 28, "channels": 3}, "num_classes": 10,
             "id": {"test": id_test},
             "near": {"gaussian": {"dataset": "gaussian_noise", "options": {"count": 50}}},
             "far": far or {}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory) -> Path:
    """An untrained OpenOOD LeNet state dict: a real model for the CLI runs, with no training."""
    from oodbench.models.openood import LeNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lenet") / "lenet.ckpt"
    torch.save(LeNet(10).state_dict(), path)
    return path


def tiny_experiment(tmp_path: Path, benchmark: Path, root: Path, checkpoint: Path) -> Path:
    config = {"benchmark": str(benchmark), "data_root": str(root),
              "models": [{"name": "openood:lenet", "checkpoint": str(checkpoint)}],
              "postprocessors": ["msp"], "search": False, "results": str(tmp_path / "results.sqlite")}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def message_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not progress bars."""
    lines = (line.strip() for line in re.split(r"[\r\n]", stderr))
    return [line for line in lines if line and not re.match(r"^[\w ]+:\s+\d+%\|", line)]


def make_bad_mnist(root: Path, problem: str) -> str:
    write_idx(root / "MNIST/raw/t10k-images-idx3-ubyte", random_images(20, 18, (28, 28)))
    labels = (np.arange(20) % 10).astype(np.uint8)
    if problem == "magic":
        write_idx(root / "MNIST/raw/t10k-labels-idx1-ubyte", labels[:, None])
        return "t10k-labels-idx1-ubyte.gz has magic number 0x00000802"
    (root / "MNIST/raw/t10k-images-idx3-ubyte.gz").unlink()
    return "MNIST file not found: expected"


@pytest.mark.parametrize("problem", ["missing file", "truncated pickle", "wrong idx magic", "list names a missing image",
                                     "unreadable image"])
def test_bad_input_through_the_cli_is_one_line_and_exit_2(problem, tmp_path, run_cli, lenet_checkpoint):
    root = tmp_path / "data"
    if problem == "missing file":
        id_test, expected = {"dataset": "mnist"}, make_bad_mnist(root, "missing")
    elif problem == "wrong idx magic":
        id_test, expected = {"dataset": "mnist"}, make_bad_mnist(root, "magic")
    elif problem == "truncated pickle":
        path = root / "cifar-10-batches-py" / "test_batch"
        write_cifar_batch(path, random_images(10, 19), np.arange(10))
        path.write_bytes(path.read_bytes()[:-7])
        id_test, expected = {"dataset": "cifar10"}, "test_batch (truncated); expected a CIFAR python-pickle batch"
    elif problem == "list names a missing image":
        write_openood(root)
        (root / "images_classic/tin/test/img_3.png").unlink()
        id_test = {"dataset": "imglist", "options": {"list": "benchmark_imglist/cifar10/test_tin.txt"}}
        expected = "line 4 names"
    else:
        write_png_folder(root / "mine", random_images(3, 20), [0, 1, 2], ["a", "b", "c"])
        (root / "mine" / "b" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        id_test, expected = {"dataset": "image_folder", "options": {"path": "mine"}}, "cannot decode image"
    config = tiny_experiment(tmp_path, tiny_benchmark(tmp_path, id_test), root, lenet_checkpoint)
    result = run_cli("run", config)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("oodbench: error: ") and expected in lines[0]


def run_partial_benchmark(tmp_path: Path, run_cli, checkpoint: Path, cache: Path | None = None):
    far = {"svhn": {"dataset": "svhn"}, "uniform": {"dataset": "uniform_noise", "options": {"count": 50}},
           "kmnist": {"dataset": "kmnist"}}
    config = tiny_experiment(tmp_path, tiny_benchmark(tmp_path, {"dataset": "sklearn_digits"}, far),
                             tmp_path / "data", checkpoint)
    env = {"PYTHONWARNINGS": "default", **({"OODBENCH_CACHE": str(cache)} if cache else {})}
    result = run_cli("run", config, "--wide", env=env)
    assert result.returncode == 0, result.stderr
    return result


def test_partial_benchmark_marks_missing_sets_in_the_table(tmp_path, run_cli, lenet_checkpoint):
    result = run_partial_benchmark(tmp_path, run_cli, lenet_checkpoint)
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    cells = [c.strip() for c in table[-1].strip("|").split("|")]
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[columns.index("svhn")] == "missing" and cells[columns.index("kmnist")] == "missing"
    assert cells[columns.index("uniform")] not in ("missing", "-")
    assert "MISSING datasets: kmnist, svhn" in result.stdout
    assert "far-OOD average over the sets present (missing: kmnist, svhn)" in result.stdout


def test_partial_benchmark_names_the_missing_sets_in_one_warning_line(tmp_path, run_cli, lenet_checkpoint):
    result = run_partial_benchmark(tmp_path, run_cli, lenet_checkpoint, cache=tmp_path / "fresh-cache")
    lines = [line for line in message_lines(result.stderr) if line.startswith("warning: missing datasets")]
    assert lines == ["warning: missing datasets (marked missing in the table): kmnist, svhn"]


def test_the_readme_benchmark_example_finds_a_users_folders(tmp_path):
    """The worked example of README's "Your own data" section, as printed, on folders laid out
    as it says: every split present, with the counts its parts give."""
    from PIL import Image

    from oodbench.datasets.benchmarks import load_benchmark
    from oodbench.tasks.data import benchmark_status

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```yaml\n(# my_bench\.yaml\n.*?)```", readme, re.S).group(1)
    (tmp_path / "my_bench.yaml").write_text(example)
    counts = {"mine/train/cats": 6, "mine/train/dogs": 6, "mine/test/cats": 10, "mine/test/dogs": 10,
              "ood/screenshots/2024": 130, "ood/other_animals": 7}
    for folder, count in counts.items():
        (tmp_path / "data" / folder).mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (index, 0, 0)).save(tmp_path / "data" / folder / f"{index}.jpg")
    rows = benchmark_status(load_benchmark(str(tmp_path / "my_bench.yaml")), tmp_path / "data")
    assert {r.split: (r.status, r.samples) for r in rows} == {
        "id:train": ("present", 12), "id:val": ("present", 4), "id:test": ("present", 16),
        "ood_val:screenshots": ("present", 100), "near:other_animals": ("present", 7),
        "far:screenshots": ("present", 30)}
