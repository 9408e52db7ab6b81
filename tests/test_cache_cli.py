"""`clipforge cache`: each kind listed with its entries and size; clearing named kinds, older entries only, a dry
run; downloads only as clipforge names them; bad requests refused before anything is removed."""
import os
import time
from pathlib import Path

import pytest

from clipforge.cli import main


def _write(path: Path, size: int, days_old: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = time.time() - days_old * 86400
    os.utime(path, (when, when))
    return path


def _cache(root: Path) -> dict:
    made = {
        "download": _write(root / "0123456789abcdef-open_clip_model.safetensors", 3000, days_old=40),
        "interrupted": _write(root / ".fedcba9876543210-model.bin.k2j3.tmp", 100, days_old=40),
        "not ours": _write(root / "notes.txt", 50, days_old=40),
        "old features": _write(root / "features" / "cifar10-test-aa.pt", 2000, days_old=40),
        "new features": _write(root / "features" / "cifar10-test-bb.pt", 1000),
        "table": _write(root / "text-features" / ("ab" * 16 + ".safetensors"), 4000, days_old=10),
        "language model": _write(root / "language-models" / "smollm-1-2" / "model.safetensors", 5000, days_old=40),
    }
    (root / "language-models" / "smollm-1-2" / "config.json").write_text("{}")
    return made


def test_list_shows_each_kind(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    assert main(["cache"]) == 0
    assert "nothing kept yet" in capsys.readouterr().out
    _cache(tmp_path / "cache")
    _write(tmp_path / "cache" / "00112233445566ff-open_clip_model.safetensors.part", 2048)  # a download cut short
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert rows["downloads"][:3] == ["3", "5.0", "KB"]  # the weights and two interrupted downloads, not notes.txt
    assert "of the downloads, 1 cut short (2.0 KB received so far): the next fetch of each file resumes it" in out
    assert rows["features"][:3] == ["2", "2.9", "KB"]
    assert rows["language-models"][:3] == ["1", "4.9", "KB"]  # a folder is one entry
    assert rows["corruptions"][:2] == ["0", "-"]


def test_clear_named_kinds_older_entries_and_dry_runs(tmp_path, monkeypatch, capsys):
    root = tmp_path / "cache"
    monkeypatch.setenv("CLIPFORGE_CACHE", str(root))
    made = _cache(root)
    assert main(["cache", "clear", "features", "downloads", "--older-than", "30", "--dry-run"]) == 0
    assert "would remove 3 entries" in capsys.readouterr().out and all(p.exists() for p in made.values())
    assert main(["cache", "clear", "features", "downloads", "--older-than", "30"]) == 0
    assert "removed 3 entries" in capsys.readouterr().out
    gone = {"download", "interrupted", "old features"}
    assert {name for name, path in made.items() if not path.exists()} == gone  # notes.txt and newer ones stay
    assert main(["cache", "clear", "--all"]) == 0
    assert [p.name for p in root.rglob("*") if p.is_file()] == ["notes.txt"]
    assert not (root / "language-models" / "smollm-1-2").exists()


def test_bad_clear_requests_remove_nothing(tmp_path, monkeypatch, capsys):
    root = tmp_path / "cache"
    monkeypatch.setenv("CLIPFORGE_CACHE", str(root))
    made = _cache(root)
    assert main(["cache", "clear"]) == 2
    assert "name the kinds to clear" in capsys.readouterr().err
    assert main(["cache", "clear", "features", "featurez"]) == 2
    assert "no kind 'featurez'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse's own error: a number above 0
        main(["cache", "clear", "features", "--older-than", "0"])
    assert usage.value.code == 2 and "expected a number above 0" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(root))  # a cache set to the home folder by mistake is not cleared
    assert main(["cache", "clear", "--all"]) == 2
    assert "not a cache folder of its own" in capsys.readouterr().err
    assert all(path.exists() for path in made.values())
