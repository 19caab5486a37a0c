import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.pack import PackError, dhash, near_duplicate_groups, pack
from tests.helpers import ROOT, synthetic_faces

CONF = OmegaConf.load(ROOT / "conf/pack/default.yaml")


def pack_cfg(tmp_path, faces_dir, **overrides):
    return OmegaConf.merge(CONF, {"faces_dir": str(faces_dir), "size": 64,
                                  "train_file": str(tmp_path / "train.npy"),
                                  "test_file": str(tmp_path / "test.npy")}, overrides)


@pytest.mark.slow
def test_shared_face_dataset_packs_into_its_unique_faces(tmp_path, faces_full):
    summary = pack(pack_cfg(tmp_path, faces_full))
    assert summary["files"] == 19992 and summary["exact_duplicates"] == 4096 and summary["unique"] == 15896
    train, test = np.load(tmp_path / "train.npy"), np.load(tmp_path / "test.npy")
    assert train.dtype == test.dtype == np.uint8
    assert train.shape[1:] == test.shape[1:] == (3, 64, 64)
    assert len(train) + len(test) == 15896 and 0.03 < len(test) / 15896 < 0.07
    both = np.concatenate([train, test]).reshape(15896, -1)
    assert len(np.unique(both, axis=0)) == 15896  # no exact duplicate left, none across the split
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert len(splits["test_files"]) == len(test)
    first = np.asarray(Image.open(faces_full / splits["test_files"][0]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(first, test[0])


def test_split_is_deterministic_and_keeps_near_duplicates_together(tmp_path, faces_sample):
    rng = np.random.default_rng(0)
    faces = tmp_path / "faces"
    faces.mkdir()
    files = list({f.read_bytes(): f for f in sorted(faces_sample.glob("*.jpg"))[:400]}.values())[:300]
    for i, f in enumerate(files):
        Image.open(f).save(faces / f"{i:03d}.png")
        if i % 10 == 0:  # a near duplicate: the same face with a little noise
            arr = np.asarray(Image.open(f)).astype(int) + rng.integers(-2, 3, (64, 64, 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(faces / f"{i:03d}_noisy.png")
    first = pack(pack_cfg(tmp_path / "a", faces, test_fraction=0.3))
    second = pack(pack_cfg(tmp_path / "b", faces, test_fraction=0.3))
    assert first["test_files"] == second["test_files"] and first["test_files"]
    sides = {name: side for side in ("train", "test") for name in first[f"{side}_files"]}
    pairs = [(n, n.replace("_noisy", "")) for n in sides if "_noisy" in n]
    assert pairs and all(sides[a] == sides[b] for a, b in pairs)

    dropped = pack(pack_cfg(tmp_path / "c", faces, drop_near_duplicates=True))
    assert dropped["near_duplicates_dropped"] >= len(pairs)


def test_near_duplicate_groups_follow_hamming_distance():
    hashes = np.array([0b0, 0b111, 0b1111111111, 0b0], dtype=np.uint64)
    assert near_duplicate_groups(hashes, 3).tolist() == [0, 0, 2, 0]
    assert near_duplicate_groups(hashes, 0).tolist() == [0, 1, 2, 0]
    assert near_duplicate_groups(hashes, -1).tolist() == [0, 1, 2, 3]
    tiles = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    assert dhash(tiles).dtype == np.uint64 and dhash(tiles)[0] != dhash(tiles)[1]


def test_empty_or_unreadable_folders_are_clear_errors(tmp_path):
    with pytest.raises(PackError, match="no face tiles in pack.faces_dir"):
        pack(pack_cfg(tmp_path, tmp_path))
    (tmp_path / "broken.png").write_bytes(b"nope")
    with pytest.raises(PackError, match="could be decoded"):
        pack(pack_cfg(tmp_path, tmp_path))


def synthetic_tiles(folder, n):
    folder.mkdir()
    for i, face in enumerate(synthetic_faces(n, seed=3)):
        Image.fromarray(face.transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
    return folder


def test_too_few_faces_for_the_split_is_an_error_that_writes_nothing(tmp_path):
    faces = synthetic_tiles(tmp_path / "faces", 3)
    with pytest.raises(PackError, match=r"3 unique faces .* both splits need faces.*about 60 groups or more"):
        pack(pack_cfg(tmp_path, faces))
    assert not (tmp_path / "train.npy").exists() and not (tmp_path / "test.npy").exists()
