import pickle
import tarfile

import numpy as np
import pytest
import torch
import torchvision

from course_lib import data
from course_lib.data import DataNotFoundError, ImageDataset, load_dataset, synthetic_dataset


def test_fashion_mnist_in_pixel_space(fmnist):
    train, test = fmnist
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.float32
    assert 0.0 == train.images.min() and train.images.max() == 1.0
    assert train.classes[0] == "T-shirt/top" and train.num_classes == 10
    assert torch.equal(train.class_counts(), torch.full((10,), 6000))


def _write_cifar_archive(folder, n_per_batch=20, seed=0):
    """A miniature CIFAR-10 in the format of cifar-10-python.tar.gz: pickled dicts of
    uint8 rows (3072 values: 1024 red, 1024 green, 1024 blue) and a list of labels
    (the real files are Python 2 pickles, whose str keys torchvision reads as latin-1 str)."""
    rng = np.random.default_rng(seed)
    src = folder / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        batches[name] = (rows, labels)
        with open(src / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": rows, "labels": labels}, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_vis": 3072}, f)
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return archive, batches


@pytest.fixture
def kit_cache(tmp_path, monkeypatch):
    """Where the kit keeps data, emptied for the test; no trust, no COURSE_DATA unless a test sets them."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv("COURSE_DATA", raising=False)
    monkeypatch.delenv(data.TRUST_ENV, raising=False)
    return tmp_path / "cache"


def test_cifar10_from_the_extracted_folder_reads_as_torchvision_does(tmp_path, monkeypatch, kit_cache):
    archive, batches = _write_cifar_archive(tmp_path)
    root = tmp_path / "root"
    torchvision.datasets.utils.extract_archive(str(archive), str(root))
    monkeypatch.setenv(data.TRUST_ENV, "1")   # a miniature archive cannot match the published MD5 sums
    train = load_dataset("cifar10", "train", root=root, download=False)
    test = load_dataset("cifar10", "test", root=root, download=False)
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    rows, labels = batches["data_batch_1"]
    first = torch.from_numpy(rows[0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(train.images[0], first)  # channel-first, scaled to [0, 1]
    assert train.labels[:20].tolist() == labels
    assert test.classes[0] == "airplane" and train.name == "cifar10"
    # control: torchvision's own reader, its checksum comparison switched off, sees the same images
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    theirs = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
    assert torch.equal(train.images, data.to_pixel_tensor(theirs.data)) and train.labels.tolist() == theirs.targets


def test_cifar10_tarball_in_course_data_is_extracted_once(tmp_path, monkeypatch, kit_cache):
    archive, batches = _write_cifar_archive(tmp_path)
    monkeypatch.setenv("COURSE_DATA", str(archive.parent))
    monkeypatch.setenv(data.TRUST_ENV, "1")
    extractions = []
    real = torchvision.datasets.utils.extract_archive
    monkeypatch.setattr(torchvision.datasets.utils, "extract_archive",
                        lambda *a, **k: extractions.append(a) or real(*a, **k))
    test = load_dataset("cifar10", "test", download=False)
    train = load_dataset("cifar10", "train", download=False)
    assert len(extractions) == 1 and str(kit_cache) in extractions[0][1]   # once, where the kit keeps data
    assert test.labels.tolist() == batches["test_batch"][1] and len(train) == 100


def test_cifar10_checksum_mismatch_names_the_file_and_both_sums(tmp_path, monkeypatch, kit_cache):
    archive, _ = _write_cifar_archive(tmp_path)
    monkeypatch.setenv("COURSE_DATA", str(archive.parent))
    expected = torchvision.datasets.CIFAR10.tgz_md5
    found = torchvision.datasets.utils.calculate_md5(str(archive))
    with pytest.raises(data.DataChecksumError) as err:
        load_dataset("cifar10", "test", download=False)
    text = str(err.value)
    assert str(archive) in text and expected in text and found in text and f"{data.TRUST_ENV}=1" in text
    assert "not found" not in text and not kit_cache.exists()   # nothing extracted from an untrusted tarball
    root = tmp_path / "root"
    torchvision.datasets.utils.extract_archive(str(archive), str(root))
    with pytest.raises(data.DataChecksumError, match="test_batch is not the published CIFAR-10 file.*"
                                                      + torchvision.datasets.CIFAR10.test_list[0][1]):
        load_dataset("cifar10", "test", root=root, download=False)


def test_cifar10_incomplete_copy_says_what_it_lacks(tmp_path, monkeypatch, kit_cache):
    archive, _ = _write_cifar_archive(tmp_path)
    root = tmp_path / "root"
    torchvision.datasets.utils.extract_archive(str(archive), str(root))
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    monkeypatch.setenv(data.TRUST_ENV, "1")
    with pytest.raises(data.DataChecksumError, match="incomplete copy of CIFAR-10: it lacks data_batch_3"):
        load_dataset("cifar10", "train", root=root, download=False)
    assert len(load_dataset("cifar10", "test", root=root, download=False)) == 20   # the test split is whole


def test_write_synthetic_cifar10_is_learnable_cifar_shaped_data(tmp_path, monkeypatch, kit_cache):
    archive = data.write_synthetic_cifar10(tmp_path, train=200, test=50, tarball=True)
    assert archive.name == "cifar-10-python.tar.gz" and not (tmp_path / "cifar-10-batches-py").exists()
    monkeypatch.setenv(data.TRUST_ENV, "1")
    train = load_dataset("cifar10", "train", root=tmp_path, download=False)
    expected = synthetic_dataset(250, channels=3, size=32, seed=0)
    assert train.image_shape == (3, 32, 32) and torch.equal(train.labels, expected.labels[:200])
    assert (train.images - expected.images[:200]).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="train must be"):
        data.write_synthetic_cifar10(tmp_path, train=10)
    with pytest.raises(ValueError, match="folder must be"):
        data.write_synthetic_cifar10(3)


def test_missing_data_names_every_place_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path / "explicit", download=False)
    text = str(err.value)
    assert str(tmp_path / "explicit") in text and str(tmp_path / "env") in text
    assert str(tmp_path / "cache") in text and "root=" in text


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", split="validation")
    with pytest.raises(ValueError, match="root must be"):
        load_dataset("mnist", root=3)
    with pytest.raises(ValueError, match="download must be"):
        load_dataset("mnist", download="no")
    with pytest.raises(ValueError, match="array must be uint8"):
        data.to_pixel_tensor(np.zeros((2, 3)))


def test_dataset_is_immutable_and_validated(toy):
    sub = toy.subset([0, 5, 7])
    assert len(sub) == 3 and torch.equal(sub.images[1], toy.images[5])
    with pytest.raises(ValueError, match="indices"):
        toy.subset([len(toy)])
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(toy.images, toy.labels[:-1], toy.classes)
    with pytest.raises(ValueError, match="images"):
        ImageDataset(toy.images[0], toy.labels, toy.classes)
    a, b = toy.split(100, seed=1)
    assert len(a) == 100 and len(b) == len(toy) - 100
    with pytest.raises(ValueError, match="n_first"):
        toy.split(0)


def test_synthetic_dataset_is_deterministic():
    a, b = synthetic_dataset(50, seed=3), synthetic_dataset(50, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="channels"):
        synthetic_dataset(50, channels=2)
    with pytest.raises(ValueError, match="seed must be an integer"):
        synthetic_dataset(50, seed=None)
