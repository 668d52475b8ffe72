"""How image folders are listed and named for fingerprints (`oodbench.datasets.files`,
`oodbench.file_state.FileState`), pinned against slow references written here as the code did
before it was made cheap (pathlib per file, ``os.path.abspath`` per path, one hash update per
file), and against the digests that code gave on the same tree: a cache key must not move.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from oodbench import file_state, identity
from oodbench.datasets.files import IMAGE_EXTENSIONS, ImageFiles, child_path, folder_images
from oodbench.file_state import FileState

MTIME_NS = 1_600_000_000_123_456_789  # every file's, so that the size-and-mtime names are stable


def build_tree(base: Path) -> Path:
    """A data root with class folders, nested folders, odd names, hidden entries, symlinks (to
    a file inside, a file outside, a folder) and files that are not images."""
    root = base / "root"
    files = {
        "top.png": b"top", "Z.JPG": b"upper", "x.tar.png": b"double suffix", "notes.txt": b"not an image",
        "a/z.png": b"a/z", "a-1.png": b"a-1 sorts before a/ as a string, after it by parts",
        "a/deep/er/1.jpeg": b"deep", "a/deep/0.bmp": b"deep0", "a b/space name.png": b"space",
        "é/ü.webp": b"unicode", "a.b/x.gif": b"dotted folder", "a/.hidden.png": b"hidden",
        ".ipynb_checkpoints/c.png": b"hidden folder", "a/._mac.jpg": b"resource fork",
        "b/img.PNG": b"b", "b/readme.md": b"not an image", "b/.DS_Store": b"hidden",
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    (root / "empty").mkdir()
    outside = base / "outside"
    outside.mkdir()
    (outside / "far.png").write_bytes(b"outside the data root")
    (root / "b" / "link_in.png").symlink_to(root / "top.png")
    (root / "b" / "link_out.png").symlink_to(outside / "far.png")
    (root / "linked_dir").symlink_to(root / "a", target_is_directory=True)  # not entered, not a class
    for path in [*root.rglob("*"), outside / "far.png"]:
        if path.is_file() and not path.is_symlink():
            os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return root


def listed(folder: Path) -> tuple[list[str], list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tree's empty class folder (test_folder_listing_... checks the line)
        return folder_images(folder)


# --------------------------------------------------------------------------- references (the old code)


def reference_folder_images(folder: Path, classes=None) -> tuple[list[Path], list[int]]:
    """Every non-hidden image file under `folder` by pathlib, sorted by its parts; symlinked
    folders not entered; labels by first-level subfolder among the sorted class folders."""
    found = []

    def walk(directory: Path, parts: tuple[str, ...]) -> None:
        for path in directory.iterdir():
            if path.name.startswith("."):
                continue
            if path.is_dir() and not path.is_symlink():
                walk(path, (*parts, path.name))
            elif path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                found.append(((*parts, path.name), path))

    walk(folder, ())
    found.sort(key=lambda item: item[0])
    if classes is None:
        classes = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir()
                         and not p.is_symlink())
    return [path for _, path in found], [0 if len(parts) == 1 else list(classes).index(parts[0])
                                         for parts, _ in found]


def reference_relative(root: Path, path) -> str:
    absolute = os.path.abspath(path)
    prefix = os.path.join(str(Path(root).expanduser().resolve()), "")
    return (absolute[len(prefix):] if absolute.startswith(prefix) else absolute).replace(os.sep, "/")


def reference_names(root: Path, paths) -> str:
    hasher = hashlib.sha256()
    for path in paths:
        hasher.update(f"{reference_relative(root, path)}\n".encode())
    return "names:" + hasher.hexdigest()[:32]


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reference_describe(root: Path, paths, hashed: bool = False) -> str:
    """A state-less `FileState.describe`: size and mtime (or the content hash, `hashed`) per file,
    then the sample: every file of a small set, else a seeded `SAMPLE_FILES` of them."""
    hasher = hashlib.sha256()
    sizes = []
    for path in paths:
        stat = os.stat(os.path.abspath(path))
        sizes.append(stat.st_size)
        what = sha256_file(path) if hashed else f"{stat.st_size}\0{stat.st_mtime_ns}"
        hasher.update(f"{reference_relative(root, path)}\0{what}\n".encode())
    chosen = range(len(paths))
    if len(paths) > file_state.SAMPLE_FILES and sum(sizes) > file_state.WHOLE_SET_BYTES:
        chosen = np.sort(np.random.default_rng(0).choice(len(paths), file_state.SAMPLE_FILES, replace=False)).tolist()
    sample = hashlib.sha256(b"sample")
    for index in chosen:
        sample.update(f"{index}\0{sha256_file(paths[index])}\n".encode())
    hasher.update(sample.hexdigest().encode())
    return "files:" + hasher.hexdigest()[:32]


# --------------------------------------------------------------------------- tests


def test_folder_listing_equals_the_pathlib_reference(tmp_path):
    root = build_tree(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths, targets = folder_images(root)
    expected_paths, expected_targets = reference_folder_images(root)
    assert paths == [str(p) for p in expected_paths] and targets == expected_targets
    assert all(str(Path(p)) == p for p in paths)  # the text a Path of it gives (error lines, open_image)
    relative = [Path(p).relative_to(root).as_posix() for p in paths]
    assert relative.index("a/z.png") < relative.index("a-1.png")  # by parts, not as one string
    assert "b/link_in.png" in relative and "b/link_out.png" in relative and "top.png" in relative
    assert not any(part.startswith(".") or part == "linked_dir" for p in relative for part in p.split("/"))
    assert "notes.txt" not in relative and "b/readme.md" not in relative
    assert any("empty" in str(w.message) for w in caught)  # the empty class folder keeps its index
    paths, targets = folder_images(root / "a")  # nested folders only: every class folder holds images
    assert (paths, targets) == ([str(p) for p in reference_folder_images(root / "a")[0]],
                                reference_folder_images(root / "a")[1])
    classes = ["é", "b", "a", "a b", "a.b", "empty"]  # the order given, not the sorted one
    assert folder_images(root, classes)[1] == reference_folder_images(root, classes)[1]


def test_names_and_describe_equal_the_references(tmp_path, monkeypatch):
    root = build_tree(tmp_path)
    paths, _ = listed(root)
    outside = [tmp_path / "outside" / "far.png"]
    files = FileState(root)
    for chosen in (paths, paths[::3], outside + paths[:2], []):
        assert files.names(chosen) == reference_names(root, chosen)
        assert files.describe(chosen) == reference_describe(root, chosen)
        assert files.describe([Path(p) for p in chosen]) == files.describe(chosen)  # Path or text: one name
    assert FileState(root, verify=True).describe(paths) == reference_describe(root, paths, hashed=True)
    monkeypatch.setattr(file_state, "SAMPLE_FILES", 3)  # a big set: only a seeded sample is read
    monkeypatch.setattr(file_state, "WHOLE_SET_BYTES", 10)
    assert FileState(root).describe(paths) == reference_describe(root, paths)


def test_odd_paths_are_named_as_abspath_names_them(tmp_path, monkeypatch):
    """Relative paths, '..', '.', doubled and trailing separators, the root itself, paths
    outside the data root, a data root given through a symlink or relative to the cwd."""
    root = build_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    odd = ["root/a/z.png", "./root/a/z.png", "root//a/z.png", "root/a/../b/img.PNG", "root/a/deep/..",
           "root/a/.", "root/a/", "root/", "root", ".", "..", "/", "//", "///x", "//x/y", "outside/far.png",
           str(root / "top.png"), "top.png", "root/é/ü.webp", Path("root/a b/space name.png")]
    (tmp_path / "via").symlink_to(root, target_is_directory=True)
    for data_root in (root, Path("root"), tmp_path / "via", Path("./root/../root")):
        files = FileState(data_root)
        assert files.names(odd) == reference_names(data_root, odd)
        for path in odd:
            assert files.names([path]) == reference_names(data_root, [path])
    existing = [p for p in odd if os.path.isfile(p)]
    assert len(existing) >= 7
    assert FileState("root").describe(existing) == reference_describe(Path("root"), existing)


def test_file_hash_reads_every_block_and_fails_as_open_does(tmp_path):
    big = tmp_path / "big.bin"  # more than one read of 1 MiB
    big.write_bytes(np.random.default_rng(0).integers(0, 256, (5 << 19) + 7, dtype=np.uint8).tobytes())
    assert file_state._sha256_of(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    (tmp_path / "folder.png").mkdir()
    for path in (tmp_path / "missing.png", tmp_path / "folder.png", str(tmp_path / "folder.png")):
        with pytest.raises(OSError) as expected:
            open(path, "rb")
        with pytest.raises(OSError) as got:
            file_state._sha256_of(path)
        assert (type(got.value), str(got.value), got.value.filename) == (
            type(expected.value), str(expected.value), expected.value.filename)


def test_child_path_is_the_pathlib_join():
    for folder in ("/data/images", "data/images", "/", "//", "//data", ".", "..", "../x", "a b/é"):  # str of Paths
        for relative in ("a.png", "a/b.png", "a//b.png", "./a.png", "a/./b.png", "a/", "/abs.png", "..", "a/../b",
                         ".", "", "a b.png", "é.png", "...", ".hidden", "a/.", "a/..", "n1/n2/n3.JPEG"):
            assert child_path(folder, relative) == str(Path(folder) / relative), (folder, relative)


def test_image_files_keep_text_and_give_paths(tmp_path):
    root = build_tree(tmp_path)
    paths, targets = listed(root)
    dataset = ImageFiles([Path(p) for p in paths], targets, "tree")
    assert dataset.locations == paths and dataset.paths == [Path(p) for p in paths]
    files = FileState(root)
    selected = np.array([4, 0, 2])
    expected = (f"{reference_names(root, paths)}:{identity.array_digest(np.asarray(targets, np.int64))}:"
                f"{reference_describe(root, [paths[i] for i in selected])}")
    assert dataset.selection_fingerprint(selected, files) == expected
    assert ImageFiles(paths, targets, "tree").selection_fingerprint(selected, files) == expected


# The digests the code gave on this tree before listing and naming were made cheap (computed
# then, with the tree above): the same strings, so no cache entry or stored cell is re-keyed.
PINNED = {
    "names": "names:4fac1fe0c9a16206126503952ec3c524", "describe": "files:b12ded989863296d92e0d6cebed27a81",
    "describe_part": "files:82c316536ff399bc92f434ec60186682", "targets": "2cd07ca7a2567948b58ee1acda00d3d0",
    "relative": ["Z.JPG", "a/deep/0.bmp", "a/deep/er/1.jpeg", "a/z.png", "a b/space name.png", "a-1.png", "a.b/x.gif",
                 "b/img.PNG", "b/link_in.png", "b/link_out.png", "top.png", "x.tar.png", "é/ü.webp"],
}


def test_digests_equal_those_of_the_code_before(tmp_path):
    root = build_tree(tmp_path)
    paths, targets = listed(root)
    files = FileState(root)
    got = {"names": files.names(paths), "describe": files.describe(paths), "describe_part": files.describe(paths[1::2]),
           "targets": identity.array_digest(np.asarray(targets, np.int64)),
           "relative": [Path(p).relative_to(root).as_posix() for p in paths]}
    assert got == PINNED
