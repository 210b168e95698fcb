"""What keeps ``kitchen run``'s own share of the wall time down (``bench/dagster_overhead.py`` measures it).

- The ``kitchen`` command freezes the heap out of the garbage collector as it exits, so the interpreter's
  shutdown does not walk every object a run left (seconds with Dagster, MLflow and a model loaded);
  ``main`` itself, which tests call in process, does not.
- Plots are drawn on a ``matplotlib.figure.Figure``, without importing ``pyplot``.

Each check runs in a fresh interpreter, since both are about process-wide state.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "KITCHEN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_kitchen_command_is_the_entry_that_freezes_at_exit() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kitchen"] == "kitchen.cli:entry"
    assert "entry()" in (ROOT / "kitchen" / "cli" / "__main__.py").read_text()


def test_entry_returns_mains_exit_code_with_the_heap_frozen(tmp_path: Path) -> None:
    # Bad input: main returns 2 before any model or Dagster run, so this takes only the imports.
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count()))\n"
        "sys.argv = ['kitchen', 'run', 'supervised', '--max-steps', '0']\n"
        "from kitchen.cli import entry, main\n"
        "assert gc.get_freeze_count() == 0\n"
        "sys.exit(entry())\n"
    )
    done = _python(code, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "max-steps" in done.stderr.replace("max_steps", "max-steps")
    frozen = int(done.stdout.split("frozen at exit:")[1])
    assert frozen > 10_000  # the imported libraries' objects, at least


def test_plots_are_pngs_of_the_asked_size_without_pyplot(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from kitchen.eval.report import report_plot\n"
        "from kitchen_assets.metadata import bar_panels, line_plot\n"
        "series = {'loss': ([1, 2, 3], [3.0, 2.0, 1.5]), 'kl': ([1, 2, 3], [0.1, 0.2, 0.1])}\n"
        "line_plot(Path('line.png'), series, title='t', xlabel='step', ylabel='loss')\n"
        "bar_panels(Path('bars.png'), ['a', 'b'], {'x': [1.0, None], 'y': [0.5, 2.0], 'z': [0.1, 0.2]},"
        " title='t')\n"
        "rows = [{'metric': 'nll', 'delta': -0.5}, {'metric': 'exact_match', 'delta': 0.25}]\n"
        "report_plot(Path('report.png'), [(1, 2.0), (2, 1.0)], rows, {'nll': False, 'exact_match': True})\n"
        "print('pyplot imported:', 'matplotlib.pyplot' in sys.modules)\n"
    )
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pyplot imported: False" in done.stdout
    # Width x height in pixels = figsize x dpi 100, read from the PNG header (IHDR), not from matplotlib.
    sizes = {}
    for name in ("line", "bars", "report"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        sizes[name] = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    assert sizes["line"] == (600, 350)
    assert sizes["report"] == (1000, 380)
    assert sizes["bars"] == (1200, 100 + 2 * (90 + 30 * 2))  # 2 rows of panels for 3 panels, 2 labels
