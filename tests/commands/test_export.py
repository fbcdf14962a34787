"""`ccalign export` writes only the file it was given: never over a run's record, never over an
existing file unless asked."""

from __future__ import annotations

import json

from ccalign.cli import main
from ccalign.models import llamagen
from support.tiny import random_model


def _export(source, out, *options) -> int:
    return main(["export", str(source), "--format", "safetensors", "--out", str(out), *options])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_export_into_a_run_folder_keeps_the_runs_record(tmp_path, capsys):
    """Exporting RUN/final.safetensors to RUN/x.safetensors replaced the run's config.json
    (recipe, data, init) with the architecture, and exited 0."""
    run = tmp_path / "run"
    run.mkdir()
    llamagen.save(random_model(0, dim=32, n_layer=1, n_head=2), run / "final.safetensors")
    record = json.dumps({"method": {"name": "cca"}, "model": {"init": "base.safetensors"}})
    (run / "config.json").write_text(record)
    assert _export(run / "final.safetensors", run / "x.safetensors") == 1
    assert "is not an export's record (a training run's" in _one_line(capsys)
    assert (run / "config.json").read_text() == record and not (run / "x.safetensors").exists()


def test_an_existing_out_is_replaced_only_when_asked(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    llamagen.save(random_model(0, dim=32, n_layer=1, n_head=2), source)
    official = tmp_path / "mine.pt"
    official.write_bytes(b"the user's own file")
    assert main(["export", str(source), "--format", "official", "--out", str(official)]) == 1
    assert "--out" in (error := _one_line(capsys)) and "pass --overwrite" in error
    assert official.read_bytes() == b"the user's own file"
    assert main(["export", str(source), "--format", "official", "--out", str(tmp_path)]) == 2
    assert "is a folder; give the file to write" in _one_line(capsys)

    out = tmp_path / "export" / "model.safetensors"
    assert _export(source, out) == 0
    first = (out.parent / "config.json").read_text()
    llamagen.save(random_model(1, dim=32, n_layer=1, n_head=2), source)
    assert _export(source, out) == 1
    assert "pass --overwrite" in _one_line(capsys)
    assert _export(source, tmp_path / "export" / "other.safetensors") == 1  # its config.json
    assert "an earlier export's record; pass --overwrite" in _one_line(capsys)
    assert _export(source, out, "--overwrite") == 0
    assert (out.parent / "config.json").read_text() == first  # same architecture, rewritten
    assert llamagen.load(out).state_dict()["tok_embeddings.weight"].equal(
        llamagen.load(source).state_dict()["tok_embeddings.weight"])


def test_a_half_precision_export_halves_the_file_and_loads_as_float32(tmp_path):
    import torch

    from ccalign.io import read_safetensors

    source = tmp_path / "model.safetensors"
    llamagen.save(random_model(0, dim=32, n_layer=1, n_head=2), source)
    out = tmp_path / "half" / "model.safetensors"
    assert _export(source, out, "--dtype", "float16") == 0
    assert {t.dtype for t in read_safetensors(out).values()} == {torch.float16}
    assert out.stat().st_size < 0.6 * source.stat().st_size
    loaded, original = llamagen.load(out), llamagen.load(source)
    for (name, got), want in zip(loaded.state_dict().items(), original.state_dict().values(),
                                 strict=True):
        assert got.dtype == torch.float32, name
        assert torch.equal(got, want.half().float()), name
