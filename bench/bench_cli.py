"""Start-up of the operator commands: wall and CPU time (user + sys of the child, from wait4) of each command as an
operator runs it (what the `anomalyd` console script runs: `daemon.cli.main()` in a fresh interpreter each time), against `python -c pass` measured
in the same rounds. The commands run in turns, round after round, so a busy machine slows them alike; each
figure is the minimum over the rounds. On a shared machine compare the ratios and the CPU times, not the walls.

    python bench/bench_cli.py                 # 7 rounds, a temporary plant (shipped config, a few rows)
    python bench/bench_cli.py --rounds 15 --json cli.json
    python bench/bench_cli.py --tree /path/to/other/checkout   # the same commands on another checkout, same turns

`--tree` (repeatable) times the commands of other checkouts of the repository in the same turns (before/after).
Python writes no bytecode cache when PYTHONDONTWRITEBYTECODE is set (so the project's own modules are compiled on
every start); `--bytecode` gives each tree a warmed cache instead, as an installed package has.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What pip's `anomalyd` script does (`python -m daemon.cli` would load daemon.cli twice: as __main__ and when imported).
ENTRY_POINT = "import sys; from daemon.cli import main; sys.exit(main())"

# (label, command line after `anomalyd`); {config} is the plant's config file. "no database" runs in an empty folder.
COMMANDS = [
    ("defects", ["defects", "--limit", "1", "--config", "{config}"]),
    ("defects --json --all", ["defects", "--json", "--all", "--config", "{config}"]),
    ("label", ["label", "1", "normal", "--author", "bench", "--config", "{config}"]),
    ("models list", ["models", "list", "--config", "{config}"]),
    ("tokens list", ["tokens", "list", "--config", "{config}"]),
    ("stats", ["stats", "--since", "30d", "--config", "{config}"]),
    ("no database", ["defects"]),
    ("--help", ["--help"]),
]


def make_plant(directory: Path, tree: Path) -> Path:
    """The shipped config with its database in `directory`, migrated, holding a few inspections."""
    config = directory / "config.toml"
    shipped = (tree / "config.toml").read_text()
    config.write_text(shipped.replace('url = "sqlite:///var/anomalyd.db"', 'url = "sqlite:///var/bench.db"'))
    seed = """
import sys
from datetime import datetime, timedelta, timezone
from adapters.db import Inspection, make_engine, make_session_factory, upgrade
from daemon.config.settings import load_config
engine = make_engine(load_config(sys.argv[1], environ={}).database_url)
upgrade(engine)
t0 = datetime.now(timezone.utc) - timedelta(days=1)
with make_session_factory(engine)() as session, session.begin():
    session.add_all(Inspection(frame_id=f"f{i}", source="cam1", line="l1", captured_at=t0 + timedelta(minutes=i),
                               model_version="v1", score=i / 100, threshold=0.5, is_anomalous=i >= 50)
                    for i in range(100))
engine.dispose()
"""
    subprocess.run([sys.executable, "-c", seed, str(config)], check=True, env=_env(tree), capture_output=True)
    return config


def _env(tree: Path, pycache: Path | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "ANOMALYD_CONFIG"}
    env["PYTHONPATH"] = str(tree)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """(wall s, CPU s of the child, exit status) of one run."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tree", action="append", type=Path, default=[],
                        help="another checkout to time in the same turns (default: this one only)")
    parser.add_argument("--bytecode", action="store_true", help="warmed bytecode caches (as an installed package)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    trees = [REPO, *(tree.resolve() for tree in args.tree)]
    with tempfile.TemporaryDirectory(prefix="bench_cli_") as scratch:
        root = Path(scratch)
        runs = []  # (tree, label, argv, cwd, env)
        for index, tree in enumerate(trees):
            plant, empty = root / f"plant{index}", root / f"empty{index}"
            plant.mkdir()
            empty.mkdir()
            config = make_plant(plant, tree)
            env = _env(tree, root / f"pycache{index}" if args.bytecode else None)
            for label, command in COMMANDS:
                argv = [sys.executable, "-c", ENTRY_POINT, *(part.format(config=config) for part in command)]
                runs.append((tree, label, argv, empty if label == "no database" else plant, env))
        baseline = ("python -c pass", [sys.executable, "-c", "pass"], root, _env(REPO))
        best: dict[tuple[str, str], list[float]] = {}
        statuses: dict[tuple[str, str], int] = {}
        for round_index in range(args.rounds + 1):  # round 0 warms the caches and is not counted
            for tree, label, argv, cwd, env in [(REPO, *baseline), *runs]:
                wall, cpu, status = timed(argv, cwd, env)
                key = (str(tree), label)
                statuses[key] = status
                if round_index:
                    previous = best.get(key, [float("inf"), float("inf")])
                    best[key] = [min(previous[0], wall), min(previous[1], cpu)]
    base_wall, base_cpu = best[(str(REPO), "python -c pass")]
    rows = []
    print(f"{args.rounds} rounds, minimum of each; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, bytecode cache {'warmed' if args.bytecode else 'as the environment says'}")
    print(f"{'command':<24} {'wall ms':>8} {'CPU ms':>8} {'CPU / python -c pass':>21}  exit  tree")
    for (tree, label), (wall, cpu) in best.items():
        ratio = cpu / base_cpu if base_cpu else float("nan")
        rows.append({"tree": tree, "command": label, "wall_ms": round(wall * 1e3, 1), "cpu_ms": round(cpu * 1e3, 1),
                     "cpu_ratio_to_python": round(ratio, 2), "exit": statuses[(tree, label)]})
        print(f"{label:<24} {wall * 1e3:8.0f} {cpu * 1e3:8.0f} {ratio:21.1f}  {statuses[(tree, label)]:>4}  {tree}")
    if args.json:
        args.json.write_text(json.dumps({"when": datetime.now(timezone.utc).isoformat(), "rounds": args.rounds,
                                         "baseline_cpu_ms": round(base_cpu * 1e3, 1),
                                         "baseline_wall_ms": round(base_wall * 1e3, 1), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
