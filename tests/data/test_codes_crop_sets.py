"""LlamaGen's two code sets (crop range 1.1 in ``..._ten_crop``, 1.05 in ``..._ten_crop_105``).

The folders are written here exactly as LlamaGen's extract_codes_c2i.py writes them, and the
second set is found by the official rule (``ten_crop/`` -> ``ten_crop_105/`` in the path).
"""

import numpy as np
import pytest
import torch

from ccalign.data.codes import LlamaGenCodeFolder, open_codes, validate_codes

SIZE, VIEWS, N, CLASSES = 256, 10, 16, 5
FIRST, SECOND = "imagenet_code_c2i_flip_ten_crop", "imagenet_code_c2i_flip_ten_crop_105"


def write_set(root, codes, labels):
    """``root/imagenet256_codes/<i>.npy`` (1, V, N) int64 and ``..._labels/<i>.npy`` (1,) int64."""
    (root / f"imagenet{SIZE}_codes").mkdir(parents=True)
    (root / f"imagenet{SIZE}_labels").mkdir(parents=True)
    for i, (image, label) in enumerate(zip(codes, labels, strict=True)):
        np.save(root / f"imagenet{SIZE}_codes" / f"{i}.npy", image[None].astype(np.int64))
        np.save(root / f"imagenet{SIZE}_labels" / f"{i}.npy", np.array([label], dtype=np.int64))


def make_sets(tmp_path, n_images=20, second=True, second_tokens=N):
    """Both sets with the same labels; tokens of the first set in [0, 50), the second in [50, 100)
    so every item shows which set it came from."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, n_images)
    codes = [rng.integers(0, 50, (n_images, VIEWS, N))]
    write_set(tmp_path / FIRST, codes[0], labels)
    if second:
        codes.append(rng.integers(50, 100, (n_images, VIEWS, second_tokens)))
        write_set(tmp_path / SECOND, codes[1], labels)
    return codes, labels


def test_each_set_is_drawn_about_half_the_time_and_items_read_the_picked_view(tmp_path):
    codes, labels = make_sets(tmp_path)
    ds = open_codes(tmp_path / FIRST, seed=11)
    assert isinstance(ds, LlamaGenCodeFolder) and len(ds.sets) == 2 and len(ds) == 20
    counts, views_seen = np.zeros(2, dtype=int), [set(), set()]
    for epoch in range(100):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            tokens, label = ds[i]
            which, view = ds.pick(i)
            assert np.array_equal(tokens.numpy(), codes[which][i, view]), (epoch, i)
            assert int(label) == labels[i] and ds.view_index(i) == view
            counts[int(tokens.min() >= 50)] += 1
            views_seen[which].add(view)
    draws = counts.sum()  # 2000 draws: 4 sigma of Binomial(2000, 1/2) is 89.4
    assert abs(counts[1] - draws / 2) <= 4 * np.sqrt(draws) / 2, counts
    assert views_seen == [set(range(VIEWS))] * 2


def test_picks_depend_only_on_seed_epoch_index(tmp_path):
    make_sets(tmp_path, n_images=8)
    ds, fresh = open_codes(tmp_path / FIRST, seed=4), open_codes(tmp_path / FIRST, seed=4)
    for epoch in range(3):
        ds.set_epoch(epoch)
        first = [ds.pick(i) for i in range(8)]
        assert [ds.pick(i) for i in range(8)] == first  # asking again changes nothing
    fresh.set_epoch(2)  # a resumed run jumps straight to its epoch
    assert [fresh.pick(i) for i in range(8)] == first
    assert all(torch.equal(fresh[i][0], ds[i][0]) for i in range(8))
    other = open_codes(tmp_path / FIRST, seed=5)
    other.set_epoch(2)
    assert [other.pick(i) for i in range(8)] != first


@pytest.mark.parametrize("name", [FIRST, "codes"])
def test_a_single_set_reads_as_before(tmp_path, name):
    codes, labels = make_sets(tmp_path, n_images=6, second=False)
    (tmp_path / FIRST).rename(tmp_path / name)
    (tmp_path / "codes_105" / f"imagenet{SIZE}_codes").mkdir(parents=True)  # not a ten_crop pair
    ds = open_codes(tmp_path / name, seed=7)
    assert len(ds.sets) == 1
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        for i in range(6):
            view = int(np.random.default_rng([7, epoch, i]).integers(VIEWS))  # the old rule
            assert ds.pick(i) == (0, view) and ds.view_index(i) == view
            assert np.array_equal(ds[i][0].numpy(), codes[0][i, view])
    np.testing.assert_array_equal(ds.all_labels(), labels)


def test_validation_reads_both_sets(tmp_path):
    _, labels = make_sets(tmp_path, n_images=4)
    ds = open_codes(tmp_path / FIRST)
    assert ds.token_range() == (0, 99)  # 0..49 from the first set, 50..99 from the second
    validate_codes(ds, num_classes=CLASSES, vocab_size=100, seq_len=N)
    with pytest.raises(ValueError, match=r"token ids span \[0, 99\]"):
        validate_codes(ds, num_classes=CLASSES, vocab_size=50, seq_len=N)
    np.save(tmp_path / SECOND / f"imagenet{SIZE}_labels" / "2.npy", [labels[2] + 1])
    with pytest.raises(ValueError, match=r"1 labels in .*ten_crop_105.* differ .*indices \[2\]"):
        ds.all_labels()
    with pytest.raises(ValueError, match="differ"):
        validate_codes(ds, num_classes=CLASSES + 1, vocab_size=100, seq_len=N)


def test_a_second_set_with_other_images_is_refused(tmp_path):
    make_sets(tmp_path, n_images=4)
    for folder in ("codes", "labels"):
        (tmp_path / SECOND / f"imagenet{SIZE}_{folder}" / "3.npy").unlink()
    with pytest.raises(ValueError, match=r"ten_crop_105/imagenet256_codes holds 3 images but .* 4"):
        open_codes(tmp_path / FIRST)
    for folder in ("codes", "labels"):
        for path in (tmp_path / SECOND / f"imagenet{SIZE}_{folder}").iterdir():
            path.unlink()
    with pytest.raises(ValueError, match=r"ten_crop_105/imagenet256_codes holds no <index>.npy"):
        open_codes(tmp_path / FIRST)
    (tmp_path / SECOND / f"imagenet{SIZE}_labels").rmdir()
    with pytest.raises(FileNotFoundError, match=r"label folder missing: .*ten_crop_105"):
        open_codes(tmp_path / FIRST)


def test_a_second_set_with_other_sequence_lengths_is_refused(tmp_path):
    make_sets(tmp_path, n_images=3, second_tokens=9)
    with pytest.raises(ValueError, match=r"\(views, tokens\) \(10, 9\) but .* \(10, 16\)"):
        open_codes(tmp_path / FIRST)


def test_the_second_set_is_found_from_a_relative_root(tmp_path, monkeypatch):
    make_sets(tmp_path, n_images=2)
    monkeypatch.chdir(tmp_path / FIRST)
    assert len(open_codes(".").sets) == 2
    monkeypatch.chdir(tmp_path)
    assert len(open_codes(f"{FIRST}/").sets) == 2
