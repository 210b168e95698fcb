"""``kitchen.atomic.atomic_directory``: a crash mid-write leaves nothing, a concurrent writer of the same
result is tolerated, and an existing different result is handled as each caller asks (kept and the rename
refused, replaced, or an empty directory taken over). Plain files only: no model, no Dagster."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from kitchen.atomic import atomic_directory


def _listing(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) and its text."""
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _complete(directory: Path) -> bool:
    return (directory / "done").is_file()


def test_the_block_becomes_the_target_and_nothing_else_is_left(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "result"
    with atomic_directory(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".result-")
        assert not target.exists()  # nothing visible until the block completes
        (staging / "a.txt").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
    assert _listing(tmp_path) == {"deep/result/a.txt": "a", "deep/result/sub/b.txt": "b"}
    assert oct(target.stat().st_mode & 0o777) == "0o700"  # mkdtemp's, unless asked otherwise


def test_an_exception_mid_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "result"
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_directory(target) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writer_leaves_no_target(tmp_path: Path) -> None:
    """A process killed mid-write (no cleanup runs) leaves at most its hidden staging directory, never a
    target a reader would take for complete."""
    target = tmp_path / "result"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from kitchen.atomic import atomic_directory
        with atomic_directory(Path({str(target)!r})) as staging:
            (staging / "half.txt").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, check=False)
    assert done.returncode == -9
    assert not target.exists()
    assert [p.name.startswith(".result-") for p in tmp_path.iterdir()] == [True]


def test_a_concurrent_writer_of_the_same_result_is_tolerated(tmp_path: Path) -> None:
    """Two writers of one content-addressed result: the one whose rename loses drops its copy; both
    return normally and one complete result stays, with no staging left."""
    target = tmp_path / "result"
    inside = threading.Barrier(2)
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            with atomic_directory(target, already_done=_complete) as staging:
                (staging / "data.txt").write_text(text)
                (staging / "done").write_text("")
                inside.wait(timeout=10)  # both have written before either renames
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=("same",)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _listing(tmp_path) == {"result/data.txt": "same", "result/done": ""}


def test_an_existing_incomplete_or_different_result_is_not_overwritten(tmp_path: Path) -> None:
    """Without ``replace``, an existing non-empty target stays as it is: the rename fails and is raised
    unless ``already_done`` says the target holds the result; the staging copy is removed either way."""
    target = tmp_path / "result"
    target.mkdir()
    (target / "data.txt").write_text("other")
    with pytest.raises(OSError), atomic_directory(target, already_done=_complete) as staging:
        (staging / "data.txt").write_text("mine")
        (staging / "done").write_text("")
    assert _listing(tmp_path) == {"result/data.txt": "other"}  # no "done": not complete, so a failure
    with pytest.raises(OSError), atomic_directory(target) as staging:  # no rule at all
        (staging / "data.txt").write_text("mine")
    assert _listing(tmp_path) == {"result/data.txt": "other"}


def test_an_empty_directory_is_taken_over(tmp_path: Path) -> None:
    target = tmp_path / "export"
    target.mkdir()
    with atomic_directory(target, private=False) as staging:
        (staging / "card.md").write_text("card")
    assert _listing(tmp_path) == {"export/card.md": "card"}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it


def test_replace_swaps_the_old_result_out_and_back_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "weights").write_text("old")
    with atomic_directory(target, replace=True, durable=True) as staging:
        (staging / "weights").write_text("new")
    assert _listing(tmp_path) == {"checkpoint/weights": "new"}  # the old one deleted, nothing retired left

    # A failure while the new one is moved in puts the old one back.
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(src).name.startswith(".checkpoint-"):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(target, replace=True) as staging:
        (staging / "weights").write_text("newer")
    assert _listing(tmp_path) == {"checkpoint/weights": "new"}


def test_replace_and_already_done_are_exclusive(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match="exclusive"),
        atomic_directory(tmp_path / "x", replace=True, already_done=_complete),
    ):
        pass
    assert list(tmp_path.iterdir()) == []
