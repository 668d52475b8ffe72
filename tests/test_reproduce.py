"""`oodbench reproduce openood-v1.5 <table>`: what is missing is named with the command that
gets it, what is there runs over the released seeds under the openood profile, and the table
comes from `leaderboard`. With --fetch the release's archives come from a local HTTP server
(tests/test_fetch.py's), then the fetched checkpoints' numbers are recomputed here by hand.

And `oodbench run` stays network-free: it imports none of the fetch machinery and opens no socket.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tests.conftest import REPO, SHARED_DATA, SHARED_MODELS, digits_config, requires_shared
from tests.test_fetch import Server, zipped

SEEDS = (1, 2, 3, 4, 5)


def warnings_of(stderr: str) -> list[str]:
    return [line[len("warning: "):] for line in stderr.splitlines() if line.startswith("warning: ")]


def test_with_nothing_there_it_names_every_missing_part_and_exits_2(run_cli, tmp_path):
    root = tmp_path / "data"
    result = run_cli("reproduce", "openood-v1.5", "cifar10", "--data-root", str(root))
    assert result.returncode == 2
    lines = warnings_of(result.stderr)
    assert lines[0].startswith(f"openood-v1.5 cifar10: not under {root}: benchmark_imglist (benchmark_imglist), "
                               "images_classic/cifar10 (cifar10), images_classic/cifar100 (cifar100)")
    assert (f"`oodbench data fetch openood-v1.5/benchmark_imglist openood-v1.5/cifar10 openood-v1.5/cifar100 "
            "openood-v1.5/tin openood-v1.5/mnist openood-v1.5/svhn openood-v1.5/texture openood-v1.5/places365 "
            f"openood-v1.5/cifar10_res18_v1.5 --data-root {root}` gets them") in lines[0]
    assert f"(or `oodbench reproduce openood-v1.5 cifar10 --fetch --data-root {root}`)" in lines[0]
    folder = root / "openood_results/cifar10_resnet18_32x32_base_e100_lr0.1_default"
    assert lines[1] == (f"cifar10: checkpoint(s) not found: {folder}/s0/best.ckpt, {folder}/s1/best.ckpt, "
                        f"{folder}/s2/best.ckpt; `oodbench data fetch openood-v1.5/cifar10_res18_v1.5 --data-root "
                        f"{root}` gets them")
    assert lines[2] == "cifar10: not run (no checkpoint of openood:cifar10_resnet18)"
    assert result.stderr.rstrip().endswith("oodbench: error: nothing of openood-v1.5 cifar10 could run (the lines "
                                           "above say what is missing)")
    assert not root.exists() or not any(root.iterdir())  # nothing fetched without --fetch


@requires_shared
def test_osr_mnist6_runs_the_seeds_that_are_there_on_the_shared_mnist(run_cli, tmp_path):
    """OpenOOD's own MNIST-6 LeNets (../shared), placed where `data fetch` puts them; seeds 3-5 absent."""
    root = tmp_path / "data"
    osr = root / "openood_results/checkpoints/osr"
    osr.mkdir(parents=True)
    (root / "MNIST").symlink_to(SHARED_DATA / "MNIST")
    for seed in (1, 2):
        (osr / f"mnist6_seed{seed}.ckpt").symlink_to(SHARED_MODELS / "openood" / f"osr_mnist6_seed{seed}.ckpt")
    result = run_cli("reproduce", "openood-v1.5", "osr_mnist6", "--data-root", str(root), "--limit", "300",
                     "--postprocessors", "msp", "--results", str(tmp_path / "r.sqlite"))
    assert result.returncode == 0, result.stderr
    lines = warnings_of(result.stderr)
    assert any(line.startswith(f"openood-v1.5 osr_mnist6: not under {root}: benchmark_imglist (benchmark_imglist), "
                               "images_classic/mnist (mnist)") and "oodbench's fallback" in line for line in lines)
    for seed in (3, 4, 5):
        assert (f"osr_mnist6_seed{seed}: checkpoint(s) not found: {osr}/mnist6_seed{seed}.ckpt; `oodbench data fetch "
                f"openood-v1.5/osr --data-root {root}` gets them") in lines
    table = result.stdout
    assert "Conventions: openood" in table and "seeds 1, 2 " in table.replace("\n  ", " ")
    row = next(line for line in table.splitlines() if line.startswith("openood:lenet"))
    assert row.split()[1] == "msp" and "±" in row


def lenet_checkpoint(seed: int) -> bytes:
    from oodbench.models.openood import LeNet

    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save(LeNet(num_classes=6).state_dict(), buffer)
    return buffer.getvalue()


def digit(index: int) -> np.ndarray:
    """Noise images; the OOD ones (index 12 on) dimmer, so that scores separate them somewhat."""
    return np.random.default_rng(index).integers(0, 256 if index < 12 else 90, (28, 28), dtype=np.uint8)


def grey_png(index: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(digit(index), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def osr_archives() -> dict[str, bytes]:
    """OpenOOD's layouts for osr_mnist6: lists (ID labels 0..5, OOD -1) over images_classic/mnist/,
    and the OSR checkpoints as results/checkpoints/osr/mnist6_seed<N>.ckpt."""
    lists = {}
    for seed in SEEDS:
        id_lines = "".join(f"mnist/test/{i}.png {i % 6}\n" for i in range(12)).encode()
        lists[f"benchmark_imglist/osr_mnist6/train/train_mnist_6_seed{seed}.txt"] = id_lines
        lists[f"benchmark_imglist/osr_mnist6/val/val_mnist_6_seed{seed}.txt"] = id_lines
        lists[f"benchmark_imglist/osr_mnist6/test/test_mnist_6_id_seed{seed}.txt"] = id_lines
        lists[f"benchmark_imglist/osr_mnist6/test/test_mnist_4_ood_seed{seed}.txt"] = \
            "".join(f"mnist/test/{i}.png -1\n" for i in range(12, 20)).encode()
    return {"benchmark_imglist.zip": zipped(lists),
            "mnist.zip": zipped({f"test/{i}.png": grey_png(i) for i in range(20)}),
            "osr.zip": zipped({f"osr/mnist6_seed{seed}.ckpt": lenet_checkpoint(seed) for seed in SEEDS})}


def test_fetch_then_run_the_fetched_checkpoints(run_cli, tmp_path):
    server = Server()
    server.files = osr_archives()
    root, store = tmp_path / "data", tmp_path / "r.sqlite"
    try:
        result = run_cli("reproduce", "openood-v1.5", "osr_mnist6", "--fetch", "--data-root", str(root),
                         "--postprocessors", "msp", "--results", str(store), "--format", "csv",
                         env={"OODBENCH_MIRROR": f"{server.url}/files"})
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert not warnings_of(result.stderr)  # everything was fetched
    assert "osr: installed" in result.stderr and "unpacked" in result.stderr  # status lines on stderr
    assert (root / "openood_results/checkpoints/osr/mnist6_seed5.ckpt").is_file()
    # stdout is the CSV alone (one table per seed's benchmark, each with its header)
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {row["model"] for row in table} == {"openood:lenet"}, result.stdout[:500]
    assert {row["postprocessor"] for row in table} == {"msp"} and {row["seeds"] for row in table} == {"1,2,3,4,5"}
    # seed 1's MSP AUROC, recomputed from the fetched checkpoint: OpenOOD's MNIST input (grey -> RGB,
    # (x - 0.5) / 0.5), max softmax, ID positive
    from oodbench.models.openood import LeNet

    net = LeNet(num_classes=6).eval()
    net.load_state_dict(torch.load(io.BytesIO(lenet_checkpoint(1))))
    images = torch.tensor(np.stack([digit(i) for i in range(20)]), dtype=torch.float32)[:, None] / 255
    with torch.no_grad():
        msp = net(((images - 0.5) / 0.5).expand(-1, 3, -1, -1)).softmax(1).max(1).values.numpy()
    expected = roc_auc_score([1] * 12 + [0] * 8, msp)
    tidy = run_cli("leaderboard", "--results", str(store), "--benchmark", "osr_mnist6_seed1", "--format", "csv")
    rows = [r for r in csv.DictReader(io.StringIO(tidy.stdout))
            if r["postprocessor"] == "msp" and r["dataset"] == "mnist4" and r["metric"] == "auroc"]
    assert abs(expected - 0.5) > 0.2  # a test that a constant score would fail
    assert len(rows) == 1 and float(rows[0]["value"]) == pytest.approx(expected, abs=1e-9)


NETWORK_FREE = textwrap.dedent("""
    import socket, sys
    opened = []
    real = socket.socket.connect
    def connect(self, address):
        opened.append(address)
        return real(self, address)
    socket.socket.connect = connect
    from oodbench.cli import main
    code = main(["run", sys.argv[1]])
    # (pooch may be there: scikit-image's bundled images, which the digits benchmark cuts textures
    # from, are read through it, from the package's own folder)
    fetchers = sorted(m for m in ("oodbench.datasets.download", "oodbench.datasets.transfer", "requests", "gdown",
                                 "urllib3") if m in sys.modules)
    print("RESULT", code, opened, fetchers)
""")


def test_run_never_imports_the_fetch_machinery_nor_opens_a_socket(tmp_path, session_cache):
    """A fresh interpreter runs a whole (built-in) experiment; the fetch modules stay unimported and
    no socket connects (sockets are watched at `socket.socket.connect`)."""
    import os

    config = digits_config(tmp_path)
    done = subprocess.run([sys.executable, "-c", NETWORK_FREE, str(config)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OODBENCH_CACHE": str(session_cache)})
    assert "RESULT 0 [] []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_list_models_gives_fetch_commands_for_the_users_data_root(run_cli, tmp_path):
    root = tmp_path / "elsewhere"
    result = run_cli("list", "models", "--wide", "--data-root", str(root))  # one line per row
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("openood:cifar10_resnet18 "))
    assert row.rstrip().endswith(f"oodbench data fetch openood-v1.5/cifar10_res18_v1.5 --data-root {root}")
    source = next(line for line in result.stdout.splitlines() if line.startswith("openood "))
    assert source.rstrip().endswith("or an official release by name (cifar10_resnet18, imagenet200_resnet18, ...; "
                                    "`oodbench data fetch openood-v1.5`).")  # the description, whole
