"""extract-codes: crops (ADM centre crop, TenCrop order), layout, labels, resume, bad images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ccalign.cli import main
from ccalign.commands import extract_codes
from ccalign.data import images
from ccalign.data.codes import open_codes
from ccalign.data.images import (
    center_crop_arr,
    convert_image,
    list_image_folder,
    open_image,
    ten_crop,
    views,
)
from ccalign.tokenizers import VQConfig, VQModel, load, save
from support.fashion import write_fake_fashion_mnist

SIZE = 16  # crops of 16 px, tokenizer downsampling 4 -> 4x4 = 16 codes per view


def _save_16_bit_grey(path, value: int, size=(20, 20)):
    Image.fromarray(np.full(size, value, dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"  # as PIL opens 16-bit greyscale PNGs


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    _save_16_bit_grey(tmp_path / "grey16.png", 128 * 257)  # mid-grey: 32896 of 65535
    assert np.all(np.asarray(open_image(tmp_path / "grey16.png")) == 128)  # RGB, not white
    assert np.all(np.asarray(open_image(tmp_path / "grey16.png", "L")) == 128)
    ramp = np.array([[0, 257, 32767, 65535]], dtype=np.uint16)  # 32767 / 257 = 127.498
    Image.fromarray(ramp).save(tmp_path / "ramp16.tif")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "ramp16.tif", "L")),
                                  [[0, 1, 127, 255]])
    wide = Image.fromarray(np.array([[0, 514, 70000]], dtype=np.int32), "I")  # older Pillow's mode
    np.testing.assert_array_equal(np.asarray(convert_image(wide, "L")), [[0, 2, 255]])


def test_float_images_are_read_by_their_range(tmp_path):
    """A mode F (32-bit float) TIFF in [0, 1] became black: PIL's conversion clips, not scales."""
    for name, values, want in [("unit", [0.0, 0.5, 1.0], [0, 128, 255]),
                               ("bytes", [0.0, 127.6, 255.0], [0, 128, 255]),
                               ("words", [0.0, 32896.0, 65535.0], [0, 128, 255])]:
        Image.fromarray(np.array([values], dtype=np.float32), "F").save(tmp_path / f"{name}.tif")
        np.testing.assert_array_equal(np.asarray(open_image(tmp_path / f"{name}.tif", "L")),
                                      [want], err_msg=name)
    Image.fromarray(np.array([[-1.0, 2.0]], dtype=np.float32), "F").save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"pixels in \[-1, 2\]"):
        open_image(tmp_path / "neg.tif")


def test_other_image_modes_become_the_expected_rgb(tmp_path):
    Image.fromarray(np.array([[[100, 30]]], dtype=np.uint8), "LA").save(tmp_path / "la.png")
    palette = Image.new("P", (1, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30])
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "p.png")
    Image.new("CMYK", (1, 1), (0, 255, 0, 0)).save(tmp_path / "cmyk.tif")  # full magenta ink
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    bilevel.save(tmp_path / "one.png")
    expected = {"la.png": [[[100, 100, 100]]], "p.png": [[[10, 200, 30]]],
                "cmyk.tif": [[[255, 0, 255]]], "one.png": [[[0, 0, 0], [255, 255, 255]]]}
    for name, rgb in expected.items():
        image = open_image(tmp_path / name)
        assert image.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(image), rgb, err_msg=name)


def test_extract_codes_encodes_a_16_bit_png_as_mid_grey(tmp_path, monkeypatch):
    for name in ("a16", "b8"):
        (tmp_path / "data" / name).mkdir(parents=True)
    _save_16_bit_grey(tmp_path / "data" / "a16" / "grey.png", 128 * 257)
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(tmp_path / "data" / "b8" / "g.png")
    _tokenizer(tmp_path / "tok.safetensors")
    seen = []
    real_encode = images.encode_views
    monkeypatch.setattr(extract_codes, "encode_views",
                        lambda tok, v, p: seen.append(v.clone()) or real_encode(tok, v, p))
    assert main(["extract-codes", str(tmp_path / "data"), "--tokenizer",
                 str(tmp_path / "tok.safetensors"), "--out", str(tmp_path / "codes"),
                 "--workers", "0", "--views", "center", "--no-progress"]) == 0
    pixels = torch.cat(seen)
    assert pixels.shape == (2, 1, SIZE, SIZE, 3) and bool((pixels == 128).all())  # not 255
    codes = tmp_path / "codes" / f"imagenet{SIZE}_codes"
    np.testing.assert_array_equal(np.load(codes / "0.npy"), np.load(codes / "1.npy"))


def test_ten_crop_order_and_coordinates():
    arr = np.arange(5 * 7).reshape(5, 7)
    crops = ten_crop(arr, 3)
    mirror = arr[:, ::-1]
    expected = [arr[0:3, 0:3], arr[0:3, 4:7], arr[2:5, 0:3], arr[2:5, 4:7], arr[1:4, 2:5],
                mirror[0:3, 0:3], mirror[0:3, 4:7], mirror[2:5, 0:3], mirror[2:5, 4:7],
                mirror[1:4, 2:5]]
    assert crops.shape == (10, 3, 3)
    for got, want in zip(crops, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # torchvision rounds the centre offset half to even: (6-3)/2 = 1.5 -> 2, (4-3)/2 = 0.5 -> 0
    centre = ten_crop(np.arange(6 * 4).reshape(6, 4), 3)[4]
    np.testing.assert_array_equal(centre, np.arange(24).reshape(6, 4)[2:5, 0:3])


def test_center_crop_arr_halves_then_bicubic_then_crops():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))
    out = center_crop_arr(image, 16)
    # 100x60 -> BOX to 50x30 (30 < 32 stops), BICUBIC to round(50*16/30)=27 x 16, crop x 5..21
    step = image.resize((50, 30), Image.BOX).resize((27, 16), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(step)[:, 5:21])
    assert views(image, 16, "ten-crop").shape == (10, 16, 16, 3)  # via int(16*1.1) = 17
    assert views(image, 16, "flip").shape == (2, 16, 16, 3)


def _write_folder(root, corrupt=True):
    rng = np.random.default_rng(1)
    layout = {"b_shoe": [(40, 30), (20, 20)], "a_bag": [(33, 50), (18, 25), (64, 64)],
              "c_hat": [(17, 17)]}
    for name, sizes in layout.items():
        for k, (w, h) in enumerate(sizes):
            folder = root / name / ("sub" if k == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img{k}.png")
    (root / "a_bag" / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "b_shoe" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def _tokenizer(path):
    torch.manual_seed(0)
    model = VQModel(VQConfig(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=(1, 2, 2),
                             num_res_blocks=1, z_channels=32, usage_window=0, image_size=SIZE))
    save(model, path)
    return load(path)


def _expected_codes(tok, path, mode="ten-crop"):
    image = Image.open(path).convert("RGB")
    crops = views(image, SIZE, mode)
    x = torch.from_numpy(crops).float().div(255).sub(0.5).div(0.5).permute(0, 3, 1, 2)
    return tok.encode(x).numpy()


def test_extracts_layout_views_labels_and_reports_a_corrupt_image(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "codes"
    _write_folder(data)
    tok = _tokenizer(tmp_path / "tok.safetensors")
    rc = main(["extract-codes", str(data), "--tokenizer", str(tmp_path / "tok.safetensors"),
               "--out", str(out), "--flat", str(tmp_path / "flat.safetensors"), "--workers", "0",
               "--batch-size", "2", "--no-progress"])
    assert rc == 0
    index = list_image_folder(data)
    assert index.classes == ["a_bag", "b_shoe", "c_hat"]
    names = [(p.parent.name, p.name) for p, _ in index.samples]
    assert names == [("a_bag", "img0.png"), ("a_bag", "img1.png"), ("sub", "img2.png"),
                     ("b_shoe", "broken.png"), ("b_shoe", "img0.png"), ("b_shoe", "img1.png"),
                     ("c_hat", "img0.png")]
    codes_dir, labels_dir = out / "imagenet16_codes", out / "imagenet16_labels"
    assert sorted(p.name for p in codes_dir.iterdir()) == [f"{i}.npy" for i in (0, 1, 2, 4, 5, 6)]
    for i, (path, label) in enumerate(index.samples):
        if i == 3:
            continue
        codes = np.load(codes_dir / f"{i}.npy")
        assert codes.shape == (1, 10, 16) and codes.dtype == np.int64
        np.testing.assert_array_equal(codes[0], _expected_codes(tok, path))
        np.testing.assert_array_equal(np.load(labels_dir / f"{i}.npy"), np.array([label]))
    err = capsys.readouterr().err
    assert "broken.png" in err and "skipped image 3" in err
    report = (out / "extract-skipped.tsv").read_text()
    assert report.startswith("3\t") and "broken.png" in report
    flat = open_codes(tmp_path / "flat.safetensors")
    assert flat.num_views == 10 and len(flat) == 6
    np.testing.assert_array_equal(flat.all_labels(), [0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(flat.codes[3].numpy(), np.load(codes_dir / "4.npy")[0])
    assert flat.vocab_size == 64
    assert not (tmp_path / "flat.safetensors.parts").exists()


def test_resumes_after_a_kill_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write_folder(data, corrupt=False)
    _tokenizer(tmp_path / "tok.safetensors")

    def extract(out, flat):
        return main(["extract-codes", str(data), "--tokenizer", str(tmp_path / "tok.safetensors"),
                     "--out", str(out), "--flat", str(flat), "--workers", "0", "--batch-size", "2",
                     "--chunk", "2", "--views", "flip", "--no-progress"])

    extract(tmp_path / "ref", tmp_path / "ref.safetensors")
    real_write = extract_codes.LlamaGenSink.write
    written = []

    def dying_write(self, indices, codes, labels):
        if len(written) >= 4:
            raise KeyboardInterrupt  # the process is killed after two batches
        written.extend(indices)
        real_write(self, indices, codes, labels)

    monkeypatch.setattr(extract_codes.LlamaGenSink, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "run", tmp_path / "run.safetensors")
    assert sorted(p.name for p in (tmp_path / "run" / "imagenet16_codes").iterdir()) == [
        "0.npy", "1.npy", "2.npy", "3.npy"]
    assert not (tmp_path / "run.safetensors").exists()
    monkeypatch.setattr(extract_codes.LlamaGenSink, "write", real_write)
    encoded = []
    real_encode = images.encode_views
    monkeypatch.setattr(extract_codes, "encode_views",
                        lambda tok, v, p: encoded.append(len(v)) or real_encode(tok, v, p))
    extract(tmp_path / "run", tmp_path / "run.safetensors")
    assert sum(encoded) == 2  # only the two images the killed run had not reached
    for i in range(6):
        for kind in ("codes", "labels"):
            np.testing.assert_array_equal(
                np.load(tmp_path / "run" / f"imagenet16_{kind}" / f"{i}.npy"),
                np.load(tmp_path / "ref" / f"imagenet16_{kind}" / f"{i}.npy"))
    ref, run = open_codes(tmp_path / "ref.safetensors"), open_codes(tmp_path / "run.safetensors")
    assert torch.equal(ref.codes, run.codes) and torch.equal(ref.labels, run.labels)
    assert ref.num_views == 2


def test_ranks_split_the_work_and_rank_zero_merges(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write_folder(data, corrupt=False)
    _tokenizer(tmp_path / "tok.safetensors")
    args = ["extract-codes", str(data), "--tokenizer", str(tmp_path / "tok.safetensors"),
            "--workers", "0", "--views", "center", "--no-progress"]
    main(args + ["--out", str(tmp_path / "ref"), "--flat", str(tmp_path / "ref.safetensors")])
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        main(args + ["--out", str(tmp_path / "dist"), "--flat", str(tmp_path / "d.safetensors")])
    ref, dist = open_codes(tmp_path / "ref.safetensors"), open_codes(tmp_path / "d.safetensors")
    assert torch.equal(ref.codes, dist.codes) and torch.equal(ref.labels, dist.labels)
    assert ref.codes.shape == (6, 1, 16)


def test_refuses_to_resume_with_other_settings(tmp_path):
    data = tmp_path / "data"
    _write_folder(data, corrupt=False)
    _tokenizer(tmp_path / "tok.safetensors")
    args = ["extract-codes", str(data), "--tokenizer", str(tmp_path / "tok.safetensors"),
            "--out", str(tmp_path / "out"), "--workers", "0", "--no-progress"]
    assert main(args + ["--views", "center"]) == 0
    assert main(args + ["--views", "flip"]) == 1  # a clear error, not mixed codes


def test_fashion_mnist_source_writes_flat_codes(tmp_path, monkeypatch):

    images, labels = write_fake_fashion_mnist(tmp_path / "fm", train=6, test=3)
    torch.manual_seed(0)
    tok = VQModel(VQConfig(codebook_size=32, codebook_embed_dim=4, ch=8, ch_mult=(1, 2, 2),
                           num_res_blocks=1, z_channels=8, in_channels=1, norm_groups=4,
                           usage_window=0, image_size=28))
    save(tok, tmp_path / "tok.safetensors")
    rc = main(["extract-codes", "fashion-mnist:test", "--fashion-mnist-folder",
               str(tmp_path / "fm"), "--tokenizer", str(tmp_path / "tok.safetensors"), "--views",
               "center", "--flat", str(tmp_path / "fm.safetensors"), "--workers", "0",
               "--no-progress"])
    assert rc == 0
    flat = open_codes(tmp_path / "fm.safetensors")
    x = torch.from_numpy(images["test"]).float().div(255).sub(0.5).div(0.5)[:, None]
    np.testing.assert_array_equal(flat.codes[:, 0].numpy(), tok.eval().encode(x).numpy())
    np.testing.assert_array_equal(flat.all_labels(), labels["test"])


def _extract(tmp_path, data, *options) -> int:
    return main(["extract-codes", str(data), "--tokenizer", str(tmp_path / "tok.safetensors"),
                 "--workers", "0", "--no-progress", *options])


def test_a_link_back_to_the_data_root_is_left_out_and_named(tmp_path, capsys):
    """A link to a parent folder made every image count 41 times (and exit 0). Links that make
    a subset of a larger tree (a class folder, an image) are followed."""
    data = tmp_path / "data"
    _write_folder(data, corrupt=False)
    _write_folder(tmp_path / "elsewhere", corrupt=False)
    (data / "d_linked").symlink_to(tmp_path / "elsewhere" / "c_hat", target_is_directory=True)
    (data / "a_bag" / "loop").symlink_to(data, target_is_directory=True)
    (data / "c_hat" / "outside").symlink_to(tmp_path, target_is_directory=True)
    (data / "c_hat" / "same.png").symlink_to(data / "c_hat" / "img0.png")  # a file link is kept
    _tokenizer(tmp_path / "tok.safetensors")
    assert _extract(tmp_path, data, "--flat", str(tmp_path / "flat.safetensors"),
                    "--views", "center") == 0
    assert "left out 2 link(s)" in capsys.readouterr().err
    flat = open_codes(tmp_path / "flat.safetensors")
    np.testing.assert_array_equal(flat.all_labels(), [0, 0, 0, 1, 1, 2, 2, 3])  # 6, file link, d


def test_flat_output_that_is_the_image_folder_or_inside_it_is_refused(tmp_path, capsys):
    """--flat = the source folder said "complete already; delete it" (the user's images)."""
    data = tmp_path / "data"
    _write_folder(data, corrupt=False)
    _tokenizer(tmp_path / "tok.safetensors")
    assert _extract(tmp_path, data, "--flat", str(data)) == 2  # a usage error
    assert "is a folder; give the file to write" in capsys.readouterr().err
    assert _extract(tmp_path, data, "--flat", str(data / "codes.safetensors")) == 1
    assert "lies inside the image folder" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["a_bag", "b_shoe", "c_hat"]


def test_a_finished_flat_file_of_other_settings_is_refused_not_kept(tmp_path, capsys):
    """An existing --flat from another tokenizer, other views or another source was kept (exit 0)
    as if it held the codes asked for."""
    data, other = tmp_path / "data", tmp_path / "other"
    _write_folder(data, corrupt=False)
    _write_folder(other, corrupt=False)
    _tokenizer(tmp_path / "tok.safetensors")
    flat = tmp_path / "flat.safetensors"
    assert _extract(tmp_path, data, "--flat", str(flat), "--views", "center") == 0
    before = flat.read_bytes()
    capsys.readouterr()
    assert _extract(tmp_path, data, "--flat", str(flat), "--views", "center") == 0
    assert "holds these codes already" in capsys.readouterr().err
    assert _extract(tmp_path, data, "--flat", str(flat), "--views", "flip") == 1
    assert "other settings (views differ)" in capsys.readouterr().err
    assert _extract(tmp_path, other, "--flat", str(flat), "--views", "center") == 1
    assert "other settings (source differ)" in capsys.readouterr().err
    torch.manual_seed(1)
    retrained = VQModel(VQConfig(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=(1, 2, 2),
                                 num_res_blocks=1, z_channels=32, usage_window=0, image_size=SIZE))
    save(retrained, tmp_path / "tok.safetensors")  # same path, other weights
    assert _extract(tmp_path, data, "--flat", str(flat), "--views", "center") == 1
    assert "other settings (tokenizer_sha256 differ)" in capsys.readouterr().err
    assert flat.read_bytes() == before
