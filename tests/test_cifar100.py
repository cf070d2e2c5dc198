"""The CIFAR-100 task on small generated files in the real python format: reading, splits,
download/checksum/unpack safety, the restricted unpickler, batched augmentation, and a
tiny end-to-end run."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from kdbench.api import DataError
from kdbench.registry import Registry, make_plugin_manager
from kdbench_plugins.models import cifar as cifar_models
from kdbench_plugins.tasks import cifar100
from kdbench_plugins.tasks.cifar100 import FOLDER, URL, Cifar100, Cifar100Options, random_crop_flip, safe_extract

N_TRAIN, N_TEST = 200, 50


def _pickle_like_the_original(obj: dict) -> bytes:
    """Protocol 2 with numpy's pre-2.0 module name, as in the published files."""
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar(folder: Path, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fake ``train``/``test``/``meta`` files; returns the raw (data, labels) written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": labels,
                 b"coarse_labels": [lab // 5 for lab in labels], b"data": data}  # fmt: skip
        (folder / name).write_bytes(_pickle_like_the_original(batch))
        written[name] = (data, np.asarray(labels))
    (folder / "meta").write_bytes(_pickle_like_the_original({b"fine_label_names": [b"c%d" % i for i in range(100)]}))
    return written


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def file_member(name: str, payload: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def task(tmp_path: Path, **options) -> Cifar100:
    return Cifar100(Cifar100Options(**{"data_dir": str(tmp_path / "data"), "validation_size": 40, **options}))


def row_keys(images: np.ndarray) -> list[bytes]:
    return [img.tobytes() for img in images]


# --------------------------------------------------------------------------- reading and splits


def test_reads_files_and_splits_train_deterministically(tmp_path):
    raw = write_cifar(tmp_path / "data" / FOLDER)
    splits = task(tmp_path, download=False).load(str(tmp_path / "cache"))
    assert set(splits) == {"train", "validation", "test"}
    test_x, test_y = splits["test"]["image"], splits["test"]["label"]
    assert test_x.shape == (N_TEST, 3, 32, 32) and test_x.dtype == np.uint8
    # channel-major rows: pixel (c, y, x) is column c*1024 + y*32 + x
    data, labels = raw["test"]
    assert test_x[7, 2, 5, 9] == data[7, 2 * 1024 + 5 * 32 + 9]
    assert test_x[0, 1, 31, 0] == data[0, 1024 + 31 * 32]
    assert np.array_equal(test_y, labels) and test_y.dtype == np.int64

    train, val = splits["train"], splits["validation"]
    assert len(train["label"]) == N_TRAIN - 40 and len(val["label"]) == 40
    tr, va = row_keys(train["image"]), row_keys(val["image"])
    assert not set(tr) & set(va) and set(tr) | set(va) == set(row_keys(raw["train"][0].reshape(-1, 3, 32, 32)))
    # each image keeps its own label
    label_of = dict(zip(row_keys(raw["train"][0].reshape(-1, 3, 32, 32)), raw["train"][1]))
    assert [label_of[k] for k in tr] == train["label"].tolist()
    assert all(0 <= lab < 100 for lab in np.concatenate([train["label"], val["label"], test_y]))

    again = task(tmp_path, download=False).load(str(tmp_path / "cache"))
    assert np.array_equal(again["validation"]["image"], val["image"])
    # train_size takes a subset of the same training split and leaves validation alone
    small = task(tmp_path, download=False, train_size=25).load(str(tmp_path / "cache"))
    assert len(small["train"]["label"]) == 25 and set(row_keys(small["train"]["image"])) <= set(tr)
    assert np.array_equal(small["validation"]["image"], val["image"])


def test_data_dir_may_be_the_folder_itself_and_defaults_to_the_cache(tmp_path):
    write_cifar(tmp_path / "data" / FOLDER)
    direct = Cifar100(Cifar100Options(data_dir=str(tmp_path / "data" / FOLDER), validation_size=10, download=False))
    assert len(direct.load(str(tmp_path / "cache"))["test"]["label"]) == N_TEST
    default = Cifar100(Cifar100Options(validation_size=10, download=False))
    assert default.data_root(str(tmp_path / "cache")) == tmp_path / "cache" / "cifar100"


def test_validation_must_leave_training_images(tmp_path):
    write_cifar(tmp_path / "data" / FOLDER)
    with pytest.raises(DataError, match="validation_size 200 leaves no training images"):
        task(tmp_path, validation_size=N_TRAIN).load(str(tmp_path))
    with pytest.raises(ValueError):
        Cifar100Options(validation_size=0)


def test_malformed_files_are_named(tmp_path):
    folder = tmp_path / "data" / FOLDER
    write_cifar(folder)
    (folder / "test").write_bytes(_pickle_like_the_original({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}))
    with pytest.raises(DataError, match=r"test: b'data' is uint8 \(2, 100\)"):
        task(tmp_path).load(str(tmp_path))
    (folder / "test").write_bytes(_pickle_like_the_original({b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [0, 100, 5]}))
    with pytest.raises(DataError, match="row 1 has label 100"):
        task(tmp_path).load(str(tmp_path))
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-100 python-format file"):
        task(tmp_path).load(str(tmp_path))


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_unpickler_refuses_any_other_global(tmp_path, capsys):
    folder = tmp_path / "data" / FOLDER
    write_cifar(folder)
    (folder / "train").write_bytes(pickle.dumps({b"data": _Boom(), b"fine_labels": []}, protocol=2))
    with pytest.raises(DataError, match="global '(builtins|__builtin__).print' is not allowed"):
        task(tmp_path).load(str(tmp_path))
    assert "must never run" not in capsys.readouterr().out
    # numpy's current pickles (protocol 5 uses a different constructor) are still read
    data = np.arange(3072 * 2, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (folder / "train").write_bytes(pickle.dumps({b"data": data, b"fine_labels": [3, 4]}, protocol=5))
    images, labels = cifar100.read_batch(folder / "train")
    assert np.array_equal(images.reshape(2, -1), data) and labels.tolist() == [3, 4]


class _System:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_pickles_that_would_run_code_are_refused_before_anything_runs(tmp_path, monkeypatch):
    """case: a train file whose pickle calls os.system, or builds an object through a
    numpy global outside the array constructors (numpy.load could read another pickle)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / FOLDER
    write_cifar(folder)
    payloads = {
        "os.system": pickle.dumps({b"data": _System(), b"fine_labels": []}, protocol=2),
        "numpy.load": b"\x80\x02cnumpy\nload\nq\x00X\x05\x00\x00\x00otherq\x01\x85q\x02Rq\x03.",
        "builtins.eval": b"cbuiltins\neval\n(S'1+1'\ntR.",
    }
    for name, payload in payloads.items():
        (folder / "train").write_bytes(payload)
        with pytest.raises(DataError, match=rf"global '(posix|os|nt)?\.?{name.split('.')[-1]}'|global '{name}'"):
            task(tmp_path, download=False).load(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["fifo", "folder", "oversize", "dangling link"])
def test_data_files_that_are_not_regular_or_too_large_are_named(tmp_path, monkeypatch, kind):
    """case: train is a FIFO (was: read would block forever), a folder, a dangling link, or
    larger than the source bound (KDBENCH_MAX_SOURCE_BYTES): a DataError naming the file."""
    folder = tmp_path / "data" / FOLDER
    write_cifar(folder)
    train = folder / "train"
    train.unlink()
    why = {"fifo": "is a FIFO", "folder": "is a folder", "oversize": "over the limit of 1,000", "dangling link": "which does not exist"}
    if kind == "fifo":
        os.mkfifo(train)
    elif kind == "folder":
        train.mkdir()
    elif kind == "dangling link":
        train.symlink_to(tmp_path / "nowhere")
    else:
        write_cifar(folder)
        monkeypatch.setenv("KDBENCH_MAX_SOURCE_BYTES", "1000")
    fetched = []
    monkeypatch.setattr(cifar100, "fetch", lambda url, dest: fetched.append(url))
    with pytest.raises(DataError, match=f"cifar100: data_dir file {train}.* {why[kind]}"):
        task(tmp_path).load(str(tmp_path))
    assert fetched == []  # named, not taken for missing files and downloaded beside them


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "a list", "not uint8"])
def test_damaged_pickles_are_named(tmp_path, damage):
    """case: a truncated, empty or random train file, or a pickle of the wrong shape."""
    folder = tmp_path / "data" / FOLDER
    write_cifar(folder)
    good = (folder / "train").read_bytes()
    blob = {"truncated": good[: len(good) // 2], "empty": b"", "garbage": bytes(range(256)) * 4,
            "a list": pickle.dumps([1, 2, 3], protocol=2),
            "not uint8": pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"fine_labels": [0, 1]}, protocol=2)}[damage]
    (folder / "train").write_bytes(blob)
    message = {"a list": "expected a dict", "not uint8": "float32"}.get(damage, "not a CIFAR-100 python-format file")
    with pytest.raises(DataError, match=message):
        task(tmp_path, download=False).load(str(tmp_path))


def test_missing_train_file_with_download_off_says_where_to_put_it(tmp_path):
    """case: test present, train missing, download off."""
    folder = tmp_path / "data" / FOLDER
    write_cifar(folder)
    (folder / "train").unlink()
    with pytest.raises(DataError, match=f"download is off: put the python-format files at {folder}"):
        task(tmp_path, download=False).load(str(tmp_path))


def test_compute_metrics_is_accuracy_fraction(tmp_path):
    t = task(tmp_path)
    assert t.compute_metrics(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == {"accuracy": 0.75}
    assert t.main_metric == "accuracy" and t.problem.num_labels == 100 and not t.problem.is_regression


# --------------------------------------------------------------------------- download and unpack


def archive_of_fake_files(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_cifar(src / FOLDER)
    path = tmp_path / "fake.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / FOLDER, arcname=FOLDER)
    return path


def test_offline_without_files_fails_fast_with_where_to_put_them(tmp_path, monkeypatch):
    calls = []

    def offline(url: str, dest: Path) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar100, "fetch", offline)
    with pytest.raises(DataError) as err:
        task(tmp_path).load(str(tmp_path))
    assert calls == [URL]  # one try, no retry loop
    msg = str(err.value)
    assert "download failed" in msg and "no network" in msg
    assert str(tmp_path / "data" / FOLDER) in msg and "data_dir" in msg
    assert not list((tmp_path / "data").glob("*.part"))
    # with download off, nothing is fetched
    calls.clear()
    with pytest.raises(DataError, match="download is off"):
        task(tmp_path, download=False).load(str(tmp_path))
    assert calls == []


def test_download_verifies_md5_then_unpacks(tmp_path, monkeypatch):
    archive = archive_of_fake_files(tmp_path)
    monkeypatch.setattr(cifar100, "fetch", lambda url, dest: dest.write_bytes(archive.read_bytes()))
    monkeypatch.setattr(cifar100, "MD5", cifar100.md5sum(archive))
    splits = task(tmp_path).load(str(tmp_path))
    assert len(splits["test"]["label"]) == N_TEST and len(splits["train"]["label"]) == N_TRAIN - 40
    root = tmp_path / "data"
    assert (root / FOLDER / "train").is_file() and (root / cifar100.ARCHIVE).is_file()
    assert not list(root.glob(".unpack-*")) and not list(root.glob("*.part"))
    # the next load reads the unpacked files without fetching
    monkeypatch.setattr(cifar100, "fetch", lambda url, dest: pytest.fail("fetched again"))
    assert np.array_equal(task(tmp_path).load(str(tmp_path))["test"]["image"], splits["test"]["image"])


def test_download_with_wrong_checksum_is_removed_and_refused(tmp_path, monkeypatch):
    archive = archive_of_fake_files(tmp_path)  # its md5 is not the real archive's
    monkeypatch.setattr(cifar100, "fetch", lambda url, dest: dest.write_bytes(archive.read_bytes()))
    with pytest.raises(DataError, match=f"md5 {cifar100.md5sum(archive)}, expected eb9058c3a382ffc7106e4002c42a8d85"):
        task(tmp_path).load(str(tmp_path))
    root = tmp_path / "data"
    assert sorted(p.name for p in root.iterdir()) == []


def test_a_users_archive_is_checked_and_never_deleted(tmp_path, monkeypatch):
    archive = archive_of_fake_files(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / cifar100.ARCHIVE).write_bytes(archive.read_bytes())
    monkeypatch.setattr(cifar100, "fetch", lambda url, dest: pytest.fail("fetched"))
    with pytest.raises(DataError, match="does not match"):
        task(tmp_path, download=False).load(str(tmp_path))
    assert (root / cifar100.ARCHIVE).is_file()
    monkeypatch.setattr(cifar100, "MD5", cifar100.md5sum(archive))
    assert len(task(tmp_path, download=False).load(str(tmp_path))["test"]["label"]) == N_TEST


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("cifar-100-python/../../evil", "outside"),
        ("/tmp/evil", "outside"),
        ("other/evil", "outside"),
        ("link", "links"),
    ],
)
def test_unsafe_archives_are_refused_before_writing(tmp_path, bad, reason):
    ok = file_member(f"{FOLDER}/train", b"x")
    if reason == "links":
        info = tarfile.TarInfo(f"{FOLDER}/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        members = [ok, (info, None)]
    else:
        members = [ok, file_member(bad, b"evil")]
    archive = make_tar(tmp_path / "bad.tar.gz", members)
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    with pytest.raises(DataError, match=reason):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []  # not even the good member was written
    assert not (tmp_path / "evil").exists() and not (tmp_path / "a" / "evil").exists()


def test_not_a_gzip_archive(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot unpack"):
        safe_extract(tmp_path / "x.tar.gz", tmp_path)


# --------------------------------------------------------------------------- augmentation


def reference_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int = 4) -> np.ndarray:
    """One image at a time, the way torchvision's RandomCrop(padding) + flip reads."""
    out = np.empty_like(images)
    h, w = images.shape[2:]
    for i, img in enumerate(images):
        padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
        dy, dx = offsets[i]
        crop = padded[:, dy : dy + h, dx : dx + w]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


def draws(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, 9, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    return offsets.numpy(), flips.numpy()


def test_crop_flip_matches_per_image_reference():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    out = random_crop_flip(x, torch.Generator().manual_seed(11))
    offsets, flips = draws(11, 32)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert np.array_equal(out.numpy(), reference_crop_flip(x.numpy(), offsets, flips))
    assert 0 < flips.sum() < 32 and len({tuple(o) for o in offsets}) > 10  # the draw exercises both branches


def test_padding_zeros_sit_where_the_offsets_say():
    x = torch.full((16, 3, 32, 32), 255, dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(3)).numpy()
    offsets, flips = draws(3, 16)
    for img, (dy, dx), flip in zip(out, offsets, flips):
        rows = np.arange(32) + dy
        cols = np.arange(32) + dx
        inside = ((rows >= 4) & (rows < 36))[:, None] & ((cols >= 4) & (cols < 36))[None, :]
        if flip:
            inside = inside[:, ::-1]
        assert np.array_equal(img[0] == 255, inside) and np.array_equal(img[0] == 0, ~inside)
        assert (img == 0).sum() == 3 * (1024 - (32 - abs(dy - 4)) * (32 - abs(dx - 4)))


def test_flip_mirrors_without_padding():
    x = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    out = random_crop_flip(x, g, padding=0)
    ref = torch.Generator().manual_seed(7)
    torch.randint(0, 1, (20, 2), generator=ref)
    flips = torch.rand(20, generator=ref) < 0.5
    assert torch.equal(out[flips], x[flips].flip(-1)) and torch.equal(out[~flips], x[~flips])
    assert 0 < int(flips.sum()) < 20


def test_task_augment_is_seeded_and_optional(tmp_path):
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    t = task(tmp_path)
    assert t.has_augmentation
    a = t.augment({"pixel_values": x, "other": torch.ones(2)}, torch.Generator().manual_seed(0))
    b = t.augment({"pixel_values": x, "other": torch.ones(2)}, torch.Generator().manual_seed(0))
    c = t.augment({"pixel_values": x, "other": torch.ones(2)}, torch.Generator().manual_seed(1))
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and not torch.equal(a["pixel_values"], c["pixel_values"])
    assert torch.equal(a["other"], torch.ones(2))
    off = task(tmp_path, augment=False)
    assert not off.has_augmentation
    assert off.augment({"pixel_values": x}, torch.Generator())["pixel_values"] is x


# --------------------------------------------------------------------------- end to end


def test_tiny_distillation_run_on_fake_files(tmp_path, monkeypatch):
    from kdbench.executors.phases import open_store
    from kdbench.train.runner import Runner
    from kdbench.train.teachers import provide_teacher
    from kdbench.spec import build_suite

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    write_cifar(tmp_path / "data" / FOLDER)
    pm, broken = make_plugin_manager()
    for module in (cifar100, cifar_models):
        if not pm.is_registered(module):
            pm.register(module)
    registry = Registry(pm, broken)
    budget = {"steps": 3, "batch_size": 16, "eval_every": 3, "log_every": 1}
    suite = build_suite(
        {
            "name": "cifar-tiny",
            "tasks": [{"name": "cifar100", "options": {"data_dir": str(tmp_path / "data"), "validation_size": 40, "download": False}}],
            "teacher": {"model": "cifar", "options": {"arch": "resnet8"}, "train": {"budget": budget, "optimizer": {"name": "sgd", "lr": 0.05}}},
            "students": [{"model": "cifar", "options": {"arch": "wrn_16_1"}}],
            "methods": [{"name": "kd", "params": {"alpha": 0.9, "temperature": 4.0}}],
            "seeds": [0],
            "budget": budget,
            "optimizer": {"name": "sgd", "lr": 0.05},
            "quiz_fraction": 0.1,
        },
        registry=registry,
    )
    store = open_store(tmp_path / "results")
    runner = Runner(tmp_path / "results", registry, device="cpu", progress=False)
    (spec,) = suite.runs
    teacher = provide_teacher(spec, runner.results_dir, store, registry, runner.device, progress=False)
    result = runner.run(spec, teacher)
    assert result.status == "done", result.error
    assert [h["step"] for h in result.history] == [3]
    for split in ("validation", "test"):
        assert 0.0 <= result.metrics[split]["accuracy"] <= 1.0
