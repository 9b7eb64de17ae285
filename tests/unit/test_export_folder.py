"""What ``papa export`` may write over: nothing, an empty folder or an earlier export with nothing else in it. Any
other file or folder at --out (a file, a link, an export with the user's notes beside it, another library's model
folder) is refused in one line and left as it was; an export folder is read back only in its own format."""

import json

import pytest

from papa.errors import PapaError
from papa.export import CARD, CONFIG, FORMAT, WEIGHTS, read_spec, write_folder
from papa.io import current_umask


def _folder(path, config, *extra: str):
    path.mkdir()
    (path / CONFIG).write_text(json.dumps(config))
    for name in (WEIGHTS, CARD, *extra):
        (path / name).write_text("x")
    return path


def _write(out) -> None:
    with write_folder(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps({"library": "papa", "format": FORMAT}))


@pytest.mark.parametrize("earlier", ["none", "empty", "papa", "timm"])
def test_an_export_replaces_nothing_an_empty_folder_or_an_earlier_export(tmp_path, earlier):
    out = tmp_path / "export"
    if earlier == "empty":
        out.mkdir()
    elif earlier != "none":
        _folder(out, {"library": "papa"} if earlier == "papa" else {"architecture": "x", "papa": {"format": FORMAT}})
    _write(out)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG] and read_spec(out) == {"library": "papa", "format": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def _a_file(out):
    out.write_text("mine")


def _a_link_to_an_export(out):
    out.symlink_to(_folder(out.parent / "real", {"library": "papa"}), target_is_directory=True)


def _notes_beside_an_export(out):
    _folder(out, {"library": "papa"}, "notes.txt")


def _another_librarys_model(out):
    _folder(out, {"architectures": ["BertModel"]})


def _a_config_that_is_no_mapping(out):
    _folder(out, ["papa"])


def _a_config_that_is_no_json(out):
    _folder(out, {})
    (out / CONFIG).write_text("{not json")


@pytest.mark.parametrize("there", [_a_file, _a_link_to_an_export, _notes_beside_an_export, _another_librarys_model,
                                   _a_config_that_is_no_mapping, _a_config_that_is_no_json])
def test_anything_else_at_out_is_refused_and_left_as_it_was(tmp_path, there):
    out = tmp_path / "export"
    there(out)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(PapaError, match=rf"^{out} exists and is not a papa export; give another --out, or remove it$"):
        _write(out)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("config", [{"library": "papa", "format": FORMAT + 1}, {"papa": {"format": 0}}, [FORMAT]])
def test_an_export_of_another_format_is_not_read(tmp_path, config):
    (tmp_path / CONFIG).write_text(json.dumps(config))
    with pytest.raises(PapaError, match=rf"config\.json: not written by `papa export` \(format {FORMAT}\)$"):
        read_spec(tmp_path)


def test_an_export_makes_the_folders_above_it(tmp_path):
    out = tmp_path / "exports" / "cifar10" / "papa"
    _write(out)
    assert read_spec(out) == {"library": "papa", "format": FORMAT}


@pytest.mark.parametrize("earlier", [False, True])
def test_a_failed_export_leaves_what_was_there_and_raises_its_own_error(tmp_path, earlier):
    out = tmp_path / "export"
    if earlier:
        _write(out)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="^disk on fire$"), write_folder(out) as tmp:
        (tmp / WEIGHTS).write_text("half")
        raise RuntimeError("disk on fire")
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == (["export"] if earlier else [])


def test_an_export_gets_the_umasks_permissions(tmp_path):
    """Not mkdtemp's private 0700 and 0600: the folder 0777 and its files 0666, less the umask, as any new file."""
    out = tmp_path / "export"
    _write(out)
    assert out.stat().st_mode & 0o7777 == 0o777 & ~current_umask()
    assert (out / CONFIG).stat().st_mode & 0o7777 == 0o666 & ~current_umask()
