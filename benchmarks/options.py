"""run.py's command line: the options, the quick and full presets, and the
targets and scenarios they choose (with sluice-custom built from --config or
--plugins)."""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import replace
from pathlib import Path

import peers
from peers import TARGETS, Target
from scenarios import QUICK, SCENARIOS, Scenario

OUT_DIR = peers.BENCH_DIR / "out"
PRESETS = {  # what --full changes; explicit flags win
    "quick": {"scenarios": list(QUICK), "duration": 2, "repeats": 3, "warmup": 1},
    "full": {"scenarios": list(SCENARIOS), "duration": 5, "repeats": 5, "warmup": 2},
}


def names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def header(text: str) -> str:
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or name != name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not 'Name: value'")
    return f"{name}: {value.strip()}"


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, epilog="See benchmarks/README.md.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    quick, full = PRESETS["quick"], PRESETS["full"]
    parser.add_argument("--full", action="store_true",
                        help=f"every scenario, {full['repeats']} runs of {full['duration']} s, "
                             f"{full['warmup']} s warm-up (default: {','.join(quick['scenarios'])}, "
                             f"{quick['repeats']} runs of {quick['duration']} s, {quick['warmup']} s warm-up)")
    parser.add_argument("--scenarios", type=names, help=f"comma-separated, from {','.join(SCENARIOS)}")
    parser.add_argument("--targets", type=names,
                        help=f"comma-separated, from {','.join(TARGETS)},sluice-custom (default: all)")
    parser.add_argument("--config", type=Path,
                        help="your sluice config: measured as sluice-custom (see README)")
    parser.add_argument("--plugins", type=names,
                        help="your filter chain, e.g. my_filter,router: measured as sluice-custom")
    parser.add_argument("--header", action="append", default=[], type=header,
                        help="'Name: value' added to every request (repeat for more), "
                             "e.g. the API key your chain asks for")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (%(default)s)")
    parser.add_argument("--duration", type=int, help="seconds per measured run")
    parser.add_argument("--repeats", type=int, help="measured runs per target and scenario")
    parser.add_argument("--warmup", type=int, help="warm-up seconds per target and scenario")
    parser.add_argument("--idle-connections", type=int, default=10_000,
                        help="connections held in idle10k (%(default)s)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="for the JSON (%(default)s)")
    parser.add_argument("--plots-dir", type=Path,
                        help="for the PNGs (default: OUT_DIR/plots-TIMESTAMP)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = parser.parse_args(argv)
    preset = PRESETS["full" if args.full else "quick"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.duration, args.repeats, args.threads, args.idle_connections) < 1 or args.warmup < 0:
        parser.error("--duration, --repeats, --threads and --idle-connections must be at least 1, "
                     "--warmup at least 0")
    args.scenarios = choose_scenarios(parser, args)
    args.targets = choose_targets(parser, args)
    return args


def choose_scenarios(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Scenario]:
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown or not args.scenarios:
        parser.error(f"--scenarios: choose from {','.join(SCENARIOS)}")
    count = args.idle_connections
    idle = replace(SCENARIOS["idle10k"], connections=count, max_connections=count + 2000,
                   title=f"{count:,} idle keep-alive connections: RSS of the proxy")
    chosen = [idle if name == "idle10k" else SCENARIOS[name] for name in SCENARIOS if name in args.scenarios]
    return [replace(s, headers=s.headers + tuple(args.header)) for s in chosen]


def choose_targets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Target]:
    known = dict(TARGETS)
    if args.config and args.plugins:
        parser.error("--config and --plugins: choose one")
    if args.config:
        known["sluice-custom"] = peers.custom_target(load_user_config(parser, args.config), None)
    elif args.plugins:
        known["sluice-custom"] = peers.custom_target(None, args.plugins)
    chosen = args.targets or list(known)
    unknown = set(chosen) - set(known)
    if unknown:
        extra = " (sluice-custom needs --config or --plugins)" if "sluice-custom" in unknown else ""
        parser.error(f"--targets: unknown {','.join(sorted(unknown))}; choose from {','.join(known)}{extra}")
    return [target for name, target in known.items() if name in chosen]


def load_user_config(parser: argparse.ArgumentParser, path: Path) -> dict:
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {path}: {exc}")
    if not config.get("listeners"):
        parser.error(f"--config {path}: no [[listeners]]")
    return config
